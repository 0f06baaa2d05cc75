"""Preference pairs within a prompt, in the TRL shape ``prompt/chosen/rejected`` (docs/run-directory.md#pairwise)."""

import pyarrow as pa

from schemas.impressions import PROMPT_ID, TIMESTAMP, TS

PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_ID = "chosen_id"
REJECTED_ID = "rejected_id"
CHOSEN_TARGET = "chosen_target"
REJECTED_TARGET = "rejected_target"
CHOSEN_PROPENSITY = "chosen_propensity"
REJECTED_PROPENSITY = "rejected_propensity"
MARGIN = "margin"
WEIGHT = "weight"
RUN_ID = "run_id"

SCHEMA = pa.schema(
    [
        pa.field(PROMPT_ID, pa.string(), nullable=False, metadata={"doc": "the prompt both responses answer"}),
        pa.field(TS, TIMESTAMP, nullable=False,
                 metadata={"doc": "when the earlier of the two responses was shown (UTC); the date partition"}),
        pa.field(PROMPT, pa.string(), nullable=False, metadata={"doc": "prompt text (TRL's 'prompt')"}),
        pa.field(CHOSEN, pa.string(), nullable=False,
                 metadata={"doc": "response text with the higher target (TRL's 'chosen')"}),
        pa.field(REJECTED, pa.string(), nullable=False,
                 metadata={"doc": "response text with the lower target (TRL's 'rejected')"}),
        pa.field(CHOSEN_ID, pa.string(), nullable=False, metadata={"doc": "impression_id of the chosen unit"}),
        pa.field(REJECTED_ID, pa.string(), nullable=False, metadata={"doc": "impression_id of the rejected unit"}),
        pa.field(CHOSEN_TARGET, pa.float64(), nullable=False,
                 metadata={"doc": "the chosen unit's target (score.pair_target: label or target_dr)"}),
        pa.field(REJECTED_TARGET, pa.float64(), nullable=False, metadata={"doc": "the rejected unit's target"}),
        pa.field(CHOSEN_PROPENSITY, pa.float64(), nullable=False,
                 metadata={"doc": "the chosen unit's propensity of being observed"}),
        pa.field(REJECTED_PROPENSITY, pa.float64(), nullable=False,
                 metadata={"doc": "the rejected unit's propensity of being observed"}),
        pa.field(MARGIN, pa.float64(), nullable=False,
                 metadata={"doc": "chosen_target - rejected_target, at least score.min_margin"}),
        pa.field(WEIGHT, pa.float64(), nullable=False,
                 metadata={"doc": "the units' weights combined by score.pair_weight, normalised to mean 1 over pairs"}),
        pa.field(RUN_ID, pa.string(), nullable=False, metadata={"doc": "the run that wrote the pair"}),
    ],
    metadata={"obsfeed.table": "pairwise", "obsfeed.schema_version": "2"},
)
