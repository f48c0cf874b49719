"""The ClipCap teacher: official-format checkpoints load unchanged and give the prefix ClipCap computes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pkd.common.errors import ConfigError, WeightsError
from pkd.preprocess.teacher import Teacher, TeacherConfig, build_teacher

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBED, PREFIX_LEN, HIDDEN = 768, 10, 3840
WORDS = ["[UNK]", "a", "chair", "in", "the", "room", "table", "kitchen", "."]
CAPTION = ["a", "chair", "."]  # what the rigged GPT-2 below says, one word per position after the prefix


def gpt_state(vocab: int, n_positions: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 1-layer GPT-2 with ClipCap's ``gpt.*`` key names and shapes, stale attention buffers included.

    Attention and MLP outputs are zeroed and position p (p = 9, 10, 11) carries a large copy of the
    embedding of CAPTION[p - 9], so greedy decoding after a 10-token prefix says exactly CAPTION.
    """
    g = torch.Generator().manual_seed(seed)
    wte = torch.randn(vocab, EMBED, generator=g)
    wpe = torch.zeros(n_positions, EMBED)
    for offset, word in enumerate(CAPTION):
        wpe[PREFIX_LEN - 1 + offset] = 50 * wte[WORDS.index(word)]
    h = "gpt.transformer.h.0."
    causal = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.uint8)).view(1, 1, n_positions, n_positions)
    return {
        "gpt.transformer.wte.weight": wte,
        "gpt.transformer.wpe.weight": wpe,
        h + "ln_1.weight": torch.ones(EMBED),
        h + "ln_1.bias": torch.zeros(EMBED),
        h + "attn.bias": causal,
        h + "attn.masked_bias": torch.tensor(-1e4),
        h + "attn.c_attn.weight": 0.02 * torch.randn(EMBED, 3 * EMBED, generator=g),
        h + "attn.c_attn.bias": torch.zeros(3 * EMBED),
        h + "attn.c_proj.weight": torch.zeros(EMBED, EMBED),
        h + "attn.c_proj.bias": torch.zeros(EMBED),
        h + "ln_2.weight": torch.ones(EMBED),
        h + "ln_2.bias": torch.zeros(EMBED),
        h + "mlp.c_fc.weight": 0.02 * torch.randn(EMBED, 4 * EMBED, generator=g),
        h + "mlp.c_fc.bias": torch.zeros(4 * EMBED),
        h + "mlp.c_proj.weight": torch.zeros(4 * EMBED, EMBED),
        h + "mlp.c_proj.bias": torch.zeros(EMBED),
        "gpt.transformer.ln_f.weight": torch.ones(EMBED),
        "gpt.transformer.ln_f.bias": torch.zeros(EMBED),
        "gpt.lm_head.weight": wte,
    }


def mlp_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """ClipCap's MLP mapper under its official names: clip_project.model.{0,2}."""
    g = torch.Generator().manual_seed(seed)
    return {
        "clip_project.model.0.weight": torch.randn(HIDDEN, 512, generator=g) / 512**0.5,
        "clip_project.model.0.bias": 0.01 * torch.randn(HIDDEN, generator=g),
        "clip_project.model.2.weight": torch.randn(PREFIX_LEN * EMBED, HIDDEN, generator=g) / HIDDEN**0.5,
        "clip_project.model.2.bias": 0.01 * torch.randn(PREFIX_LEN * EMBED, generator=g),
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """An official-format ClipCap checkpoint and an open_clip ViT-B-32-quickgelu state dict, random values."""
    from pkd.preprocess.torchvision_compat import import_open_clip

    root = tmp_path_factory.mktemp("weights")
    clipcap = root / "conceptual_weights.pt"
    torch.save({**mlp_state(), **gpt_state(len(WORDS))}, clipcap)
    torch.manual_seed(123)
    model = import_open_clip().create_model("ViT-B-32-quickgelu", pretrained=None)
    clip = root / "open_clip_vit_b32_quickgelu.pt"
    torch.save(model.state_dict(), clip)
    return {"clip": clip, "clipcap": clipcap}


@pytest.fixture(scope="module")
def random_teacher() -> Teacher:
    return build_teacher(TeacherConfig(kind="random", seed=0, patch_tokens=True))


class Node(torch.nn.Module):
    """A module holding only buffers, to script a TorchScript archive with given state-dict keys."""


def torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save ``state`` as a TorchScript archive, the container format of OpenAI's ViT-B-32.pt."""
    root = Node()
    for key, value in state.items():
        *names, leaf = key.split(".")
        module = root
        for name in names:
            if not hasattr(module, name):
                module.add_module(name, Node())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    torch.jit.save(torch.jit.script(root), str(path))


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_official_checkpoints_give_clipcaps_prefix(weights, scannet_scene):
    from pkd.preprocess.torchvision_compat import import_open_clip

    teacher = build_teacher(TeacherConfig(clip_weights=str(weights["clip"]), clipcap_weights=str(weights["clipcap"])))
    image = Image.open(scannet_scene / "color" / "0.jpg")
    out = teacher.encode(teacher.transform(image)[None])

    # Independent path: open_clip's own loader and transform, ClipCap's mapper written out by hand.
    model, _, preprocess = import_open_clip().create_model_and_transforms(
        "ViT-B-32-quickgelu", pretrained=str(weights["clip"])
    )
    with torch.no_grad():
        embed = model.eval().encode_image(preprocess(image)[None]).float()
    sd = mlp_state()
    hidden = torch.tanh(embed @ sd["clip_project.model.0.weight"].T + sd["clip_project.model.0.bias"])
    prefix = (hidden @ sd["clip_project.model.2.weight"].T + sd["clip_project.model.2.bias"]).reshape(1, 10, 768)

    assert out.prefix.shape == (1, 10, 768) and out.clip_embed.shape == (1, 512) and out.patch_tokens is None
    assert out.prefix.dtype == torch.float32
    torch.testing.assert_close(out.clip_embed.half(), embed.half(), rtol=2**-10, atol=1e-4)
    torch.testing.assert_close(out.prefix.half(), prefix.half(), rtol=2**-10, atol=1e-4)
    ident = teacher.identity
    assert ident.random is False and ident.clip_model == "ViT-B-32-quickgelu"
    assert ident.mapper == "clipcap-mlp-prefix10"
    assert len(ident.clip_weights_sha256) == 64 and len(ident.clipcap_weights_sha256) == 64
    assert ident.transform.interpolation == "bicubic" and ident.transform.image_size == 224


def test_openai_torchscript_archive_loads(weights, tmp_path):
    # OpenAI ships fp16 weights in a TorchScript archive with three extra scalar entries.
    state = {k: v.half() if v.is_floating_point() else v for k, v in torch.load(weights["clip"]).items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    archive = tmp_path / "ViT-B-32.pt"
    torchscript_archive(state, archive)
    teacher = build_teacher(TeacherConfig(clip_weights=str(archive), clipcap_weights=str(weights["clipcap"])))
    loaded = teacher.visual.state_dict()
    for key, value in state.items():
        if key.startswith("visual."):
            assert torch.equal(loaded[key[len("visual.") :]], value.float()), key


def test_transformer_mapper_checkpoint_refused(tmp_path):
    path = tmp_path / "transformer_weights.pt"
    mapper = {
        "clip_project.prefix_const": torch.randn(40, EMBED),
        "clip_project.linear.weight": torch.randn(10 * EMBED, 512),
        "clip_project.linear.bias": torch.randn(10 * EMBED),
    }
    for i in range(2):
        layer = f"clip_project.transformer.layers.{i}."
        mapper.update(
            {
                layer + "norm1.weight": torch.ones(EMBED),
                layer + "attn.to_queries.weight": torch.randn(EMBED, EMBED),
                layer + "mlp.fc1.weight": torch.randn(2 * EMBED, EMBED),
            }
        )
    torch.save({**mapper, **gpt_state(len(WORDS))}, path)
    with pytest.raises(WeightsError) as err:
        build_teacher(TeacherConfig(clip_weights=str(path), clipcap_weights=str(path)))
    message = str(err.value)
    assert "transformer mapper" in message and "prefix length 40" in message and "MLP mapper" in message
    assert str(path) in message


def test_missing_weights_explain_where_to_get_them(tmp_path, weights):
    with pytest.raises(WeightsError, match="CLIP_prefix_caption") as err:
        build_teacher(TeacherConfig(clip_weights=str(weights["clip"]), clipcap_weights=str(tmp_path / "no.pt")))
    assert "does not exist" in str(err.value) and "--teacher random" in str(err.value)
    with pytest.raises(WeightsError, match="openai") as err:
        build_teacher(
            TeacherConfig(clip_weights=str(tmp_path / "ViT-B-32.pt"), clipcap_weights=str(weights["clipcap"]))
        )
    assert "--teacher random" in str(err.value)
    with pytest.raises(WeightsError, match="no CLIP weights given"):
        build_teacher(TeacherConfig())


def test_bad_precision_and_device_refused():
    with pytest.raises(ConfigError, match="fp16"):
        build_teacher(TeacherConfig(kind="random", precision="fp16"))
    with pytest.raises(ConfigError, match="precision"):
        build_teacher(TeacherConfig(kind="random", precision="int8"))
    with pytest.raises(ConfigError, match="kind"):
        build_teacher(TeacherConfig(kind="clip"))


def test_random_teacher_is_seeded_and_marked(random_teacher):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    before = torch.random.get_rng_state()
    again = build_teacher(TeacherConfig(kind="random", seed=0))
    assert torch.equal(torch.random.get_rng_state(), before), "building must not disturb the global RNG"
    other = build_teacher(TeacherConfig(kind="random", seed=1))
    a, b, c = random_teacher.encode(x), again.encode(x), other.encode(x)
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.clip_embed, b.clip_embed)
    assert not torch.allclose(a.prefix, c.prefix)
    ident = random_teacher.identity
    assert ident.random is True and ident.seed == 0
    assert ident.clip_weights_sha256 is None and ident.clipcap_weights_sha256 is None


def test_patch_tokens(random_teacher):
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    out = random_teacher.encode(x)
    assert out.patch_tokens.shape == (3, 49, 512) and out.patch_tokens.dtype == torch.float32
    assert out.prefix.shape == (3, 10, 768) and out.clip_embed.shape == (3, 512)
    with pytest.raises(ValueError, match="224"):
        random_teacher.encode(torch.zeros(1, 3, 256, 256))


def test_caption_greedy_and_beam(weights, tmp_path):
    from pkd.preprocess.caption import load_captioner

    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer_dir)
    captioner = load_captioner(str(weights["clipcap"]), str(tokenizer_dir))
    prefix = 0.1 * np.random.default_rng(0).standard_normal((10, 768)).astype(np.float32)
    assert captioner.caption(prefix, beam=1).split() == CAPTION
    assert captioner.caption(torch.from_numpy(prefix)[None], beam=3).split() == CAPTION
    assert captioner.caption(prefix, beam=1, max_len=2).split() == CAPTION[:2]


def test_caption_tokenizer_folder_missing(weights, tmp_path):
    from pkd.preprocess.caption import load_captioner

    with pytest.raises(ConfigError, match="tokenizer"):
        load_captioner(str(weights["clipcap"]), str(tmp_path / "none"))


def test_import_open_clip_in_fresh_process():
    code = "from pkd.preprocess.torchvision_compat import import_open_clip; print(import_open_clip().__version__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
