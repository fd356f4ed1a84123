"""Framework integrations. ``hydra.integrations.transformers`` plugs hydra into
Hugging Face transformers (an attention function and a ``Cache``); the attention
function itself (``hydra.hydra_attention``) needs no transformers import."""
