"""Turn a ClipCap prefix back into text with ClipCap's GPT-2, for inspecting targets by eye.

GPT-2 is rebuilt from the ``gpt.*`` keys of the ClipCap checkpoint (config read off the tensor
shapes). Decoding follows ClipCap's ``generate2`` (greedy) and ``generate_beam`` (beam search with
length-averaged log-probabilities): feed the prefix embeddings, then each chosen token's embedding,
until the '.' token or ``max_len`` tokens. Never needed to compute targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pkd.common.errors import ConfigError, WeightsError
from pkd.preprocess import teacher_weights as tw
from pkd.preprocess.torchvision_compat import ensure_torchvision

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

STOP_TOKEN = "."
GPT2_HEAD_DIM = 64  # every released GPT-2 size uses 64-dim heads (small: 768 = 12 x 64)


def _gpt2_config(state: dict[str, torch.Tensor], n_head: int | None, eos_token_id: int | None) -> GPT2Config:
    from transformers import GPT2Config

    vocab, n_embd = state["transformer.wte.weight"].shape
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    return GPT2Config(
        vocab_size=vocab,
        n_embd=n_embd,
        n_positions=state["transformer.wpe.weight"].shape[0],
        n_layer=len(layers),
        n_head=n_head or n_embd // GPT2_HEAD_DIM,
        n_inner=state["transformer.h.0.mlp.c_fc.weight"].shape[1],
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def _load_tokenizer(tokenizer: str | Path | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_dir():
        raise ConfigError(
            f"tokenizer folder {path} does not exist; pass --tokenizer DIR holding GPT-2's tokenizer "
            "in Hugging Face format (vocab.json + merges.txt or tokenizer.json), e.g. a saved copy "
            "of the 'gpt2' tokenizer."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path}: {exc}") from exc


@dataclass
class Captioner:
    """ClipCap's GPT-2 and tokenizer; ``caption`` decodes one (10, 768) prefix."""

    gpt: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device

    @property
    def stop_token_id(self) -> int:
        return self.tokenizer.encode(STOP_TOKEN)[0]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt.transformer.wte(tokens)

    def _next_logprobs(self, embeds: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.gpt(inputs_embeds=embeds).logits[:, -1, :].float(), dim=-1)

    @torch.no_grad()
    def caption(self, prefix: np.ndarray | torch.Tensor, beam: int = 5, max_len: int = 67) -> str:
        """Text for one prefix of shape (10, 768) or (1, 10, 768); beam <= 1 decodes greedily."""
        embeds = torch.as_tensor(np.asarray(prefix, dtype=np.float32) if isinstance(prefix, np.ndarray) else prefix)
        embeds = embeds.float().to(self.device).reshape(1, -1, self.gpt.config.n_embd)
        max_len = min(max_len, self.gpt.config.n_positions - embeds.shape[1])  # GPT-2 has no positions beyond
        tokens = self._greedy(embeds, max_len) if beam <= 1 else self._beam(embeds, beam, max_len)
        return str(self.tokenizer.decode(tokens))

    def _greedy(self, embeds: torch.Tensor, max_len: int) -> list[int]:
        stop, tokens = self.stop_token_id, []
        for _ in range(max_len):
            token = int(self._next_logprobs(embeds).argmax(-1))
            tokens.append(token)
            if token == stop:
                break
            embeds = torch.cat([embeds, self._embed(torch.tensor([[token]], device=self.device))], dim=1)
        return tokens

    def _beam(self, embeds: torch.Tensor, beam: int, max_len: int) -> list[int]:
        stop = self.stop_token_id
        scores, tokens = self._next_logprobs(embeds)[0].topk(beam)  # (beam,), first token of each beam
        tokens = tokens[:, None]
        lengths = torch.ones(beam, device=self.device)
        stopped = tokens[:, 0] == stop
        embeds = torch.cat([embeds.expand(beam, -1, -1), self._embed(tokens)], dim=1)
        for _ in range(max_len - 1):
            if stopped.all():
                break
            logprobs = self._next_logprobs(embeds)
            logprobs[stopped] = -torch.inf
            logprobs[stopped, 0] = 0.0  # a finished beam carries on unchanged (its padding is cut below)
            lengths = lengths + (~stopped)
            average = (scores[:, None] + logprobs) / lengths[:, None]
            best, flat = average.view(-1).topk(beam)
            source, token = flat // logprobs.shape[1], flat % logprobs.shape[1]
            lengths, stopped = lengths[source], stopped[source]
            scores = best * lengths
            tokens = torch.cat([tokens[source], token[:, None]], dim=1)
            embeds = torch.cat([embeds[source], self._embed(token[:, None])], dim=1)
            stopped = stopped | (token == stop)
        winner = int((scores / lengths).argmax())
        return tokens[winner, : int(lengths[winner])].tolist()


def load_captioner(
    clipcap_weights: str,
    tokenizer: str | Path | PreTrainedTokenizerBase,
    device: str = "cpu",
    n_head: int | None = None,
) -> Captioner:
    """Rebuild ClipCap's GPT-2 from its checkpoint; ``tokenizer`` is an HF tokenizer or a folder holding one."""
    ensure_torchvision()  # transformers imports torchvision's transforms
    from transformers import GPT2LMHeadModel

    tok = _load_tokenizer(tokenizer)
    state = tw.gpt_state_dict(clipcap_weights)
    config = _gpt2_config(state, n_head, tok.eos_token_id)
    if len(tok) > config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tok)} tokens but the GPT-2 in {clipcap_weights} only "
            f"{config.vocab_size}; pass GPT-2's own tokenizer."
        )
    gpt = GPT2LMHeadModel(config)
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied to wte in GPT-2
    try:
        gpt.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"GPT-2 weights in {clipcap_weights} do not fit the inferred config "
            f"({config.n_layer} layers, {config.n_embd} wide, {config.n_head} heads): {exc}"
        ) from exc
    return Captioner(gpt=gpt.eval().to(device), tokenizer=tok, device=torch.device(device))
