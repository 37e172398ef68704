"""GLUE tasks, data, BERT-family models and the training/evaluation loops every script shares: the code is in
glue_attribution/pipeline.py (and the checkpoints in glue_attribution/checkpoints.py); this file keeps their names
where the scripts have always found them, `import pipeline`."""

from glue_attribution.checkpoints import (  # noqa: F401  (the seed's pipeline.py held the checkpoints too)
    CHECKPOINT_META,
    TRAINING_MARGINS,
    checkpoint_meta,
    epoch_member,
    load_checkpoint,
    save_checkpoint,
)
from glue_attribution.pipeline import *  # noqa: F403
