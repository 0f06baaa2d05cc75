"""Preference pairs within a prompt, in the TRL shape ``prompt/chosen/rejected`` (DESIGN §3, §5)."""

import pyarrow as pa

from schemas.impressions import PROMPT_ID

PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_ID = "chosen_id"
REJECTED_ID = "rejected_id"
CHOSEN_TARGET = "chosen_target"
REJECTED_TARGET = "rejected_target"
MARGIN = "margin"
WEIGHT = "weight"
RUN_ID = "run_id"

PAIRWISE = pa.schema(
    [
        pa.field(PROMPT_ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string()),
        pa.field(CHOSEN, pa.string()),
        pa.field(REJECTED, pa.string()),
        pa.field(CHOSEN_ID, pa.string(), nullable=False, metadata={"doc": "impression_id of the chosen unit"}),
        pa.field(REJECTED_ID, pa.string(), nullable=False),
        pa.field(CHOSEN_TARGET, pa.float64(), nullable=False),
        pa.field(REJECTED_TARGET, pa.float64(), nullable=False),
        pa.field(MARGIN, pa.float64(), nullable=False, metadata={"doc": "chosen_target - rejected_target"}),
        pa.field(WEIGHT, pa.float64(), nullable=False,
                 metadata={"doc": "combined unit weights, normalised to mean 1 over pairs"}),
        pa.field(RUN_ID, pa.string(), nullable=False),
    ],
    metadata={"obsfeed.table": "pairwise", "obsfeed.schema_version": "1"},
)
