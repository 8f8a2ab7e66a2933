"""Models: the T5 v1.1 encoder-decoder module (and, beside it, the T5X-style model wrapper)."""

from repeat_lm.models.t5 import T5Config, Transformer
from repeat_lm.models.encoder_decoder import EncoderDecoderModel
