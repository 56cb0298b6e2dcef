"""Alias of ``fasttfm.flash_attn_interface`` (flash-attn's package exports the same names at its top
level: ``from flash_attn import flash_attn_func`` becomes ``from fasttfm.flash_attn import flash_attn_func``),
plus the ``bert_padding`` helpers."""
from fasttfm import bert_padding  # noqa: F401
from fasttfm.flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func,  # noqa: F401
                                          flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                          flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                                          flash_attn_with_kvcache)
from fasttfm.flash_attn_interface import __all__ as _names

__all__ = list(_names) + ["bert_padding"]
