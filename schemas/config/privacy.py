"""``[privacy]``: the key that pseudonymises user ids."""

from __future__ import annotations

from pydantic import Field

from schemas.config.base import Section


class PrivacyConfig(Section):
    key_env: str = Field("OBSFEED_HASH_KEY", description="environment variable holding the HMAC key")
    allow_unkeyed: bool = Field(False, description="hash user ids without a key (not pseudonymous!)")
