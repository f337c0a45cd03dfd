"""fastmlm's ops: each a torch.library custom op whose backend is chosen per call.

See docs/ops.md for the contract and `fastmlm.ops.dispatch` for backend choice.
"""
from fastmlm.ops.attention import attention
from fastmlm.ops.checks import no_value_checks
from fastmlm.ops.cross_entropy import mlm_cross_entropy
from fastmlm.ops.dispatch import BackendUnavailable, use_backend
from fastmlm.ops.gather import gather_rows
from fastmlm.ops.masking import mask_tokens, masked_positions
from fastmlm.ops.mlm_head import mlm_head

__all__ = [
    "attention",
    "gather_rows",
    "mask_tokens",
    "masked_positions",
    "mlm_cross_entropy",
    "mlm_head",
    "use_backend",
    "no_value_checks",
    "BackendUnavailable",
]
