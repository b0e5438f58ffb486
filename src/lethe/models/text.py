"""Text encoders that turn prompts into per-token states for cross-attention.

Both expose `tokenize(prompts) -> LongTensor` and `forward(ids) -> B x L x D`, so training, sampling
and every method treat them alike.

- `SmallTextEncoder` (embedded default): open_clip's BPE tokenizer and a small transformer. CLIP's
  49,408-token table would dwarf a 1M-parameter U-Net, so only the tokens the corpus uses get a row
  (the rest share an "unknown" row); that token list is part of the saved config.
- `ClipTextEncoder` (Stable Diffusion): the checkpoint's own CLIP tokenizer and text model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

PAD_ROW, UNKNOWN_ROW = 0, 1
CLIP_VOCAB_SIZE = 49408


@functools.cache
def clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")  # its BPE vocabulary ships inside the wheel


def corpus_vocabulary(texts: list[str]) -> list[int]:
    """The sorted BPE ids used by `texts`, plus start and end of text."""
    tokenizer = clip_tokenizer()
    ids = {tokenizer.sot_token_id, tokenizer.eot_token_id}
    for text in texts:
        ids.update(tokenizer.encode(text))
    return sorted(ids)


class SmallTextEncoder(nn.Module):
    def __init__(self, vocabulary: list[int], width: int, layers: int, heads: int, context_length: int,
                 pad_with_end: bool = False):
        super().__init__()
        self.context_length, self.pad_with_end = context_length, pad_with_end
        row_of = torch.full((CLIP_VOCAB_SIZE,), UNKNOWN_ROW, dtype=torch.long)
        row_of[torch.tensor(vocabulary)] = torch.arange(2, len(vocabulary) + 2)
        row_of[0] = PAD_ROW  # the tokenizer pads with id 0
        self.register_buffer("row_of", row_of, persistent=False)  # derived from the saved vocabulary
        self.token_embedding = nn.Embedding(len(vocabulary) + 2, width)
        self.position_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        causal = torch.triu(torch.full((context_length, context_length), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    @property
    def dim(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def end_token_id(self) -> int:
        return clip_tokenizer().eot_token_id

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = clip_tokenizer()(list(prompts), context_length=self.context_length)
        if self.pad_with_end:  # SD's CLIP pads with its end token, so padding positions share its embedding
            ids = torch.where(ids == 0, self.end_token_id, ids)
        return ids

    def known_tokens(self, prompts: list[str]) -> int:
        """How many of the prompts' tokens have their own embedding row (not start, end or unknown)."""
        ids = self.tokenize(prompts)
        special = (ids == 0) | (ids == clip_tokenizer().sot_token_id) | (ids == self.end_token_id)
        return int(((self.row_of[ids] != UNKNOWN_ROW) & ~special).sum())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(self.row_of[ids]) + self.position_embedding
        x = self.transformer(x, mask=self.causal_mask, is_causal=True)
        return self.final_norm(x)


class ClipTextEncoder(nn.Module):
    """A Stable Diffusion checkpoint's tokenizer and CLIP text model, loaded from a local directory."""

    def __init__(self, pretrained_path: str):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()  # its "Loading weights" bar is noise beside the stage's own progress
        self.tokenizer = CLIPTokenizer.from_pretrained(pretrained_path, subfolder="tokenizer", local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(pretrained_path, subfolder="text_encoder", local_files_only=True)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def end_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True,
            max_length=self.tokenizer.model_max_length, return_tensors="pt",
        ).input_ids

    def known_tokens(self, prompts: list[str]) -> int:
        """How many of the prompts' tokens the tokenizer knows (not special, not its unknown token)."""
        ids = self.tokenize(prompts)
        special = torch.tensor(self.tokenizer.all_special_ids)
        return int((~torch.isin(ids, special)).sum())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).last_hidden_state
