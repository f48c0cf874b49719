"""Versioned run records (pkd.train.records): old records upgrade, unknown keys and newer versions are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pkd.common.errors import ConfigError
from pkd.train import runs
from pkd.train.checkpoint import LAST, atomic_save, load_checkpoint
from pkd.train.config import upgrade_config
from pkd.train.export import export_encoder
from pkd.train.model import StudentConfig
from pkd.train.records import RecordKind, read_record, write_record
from pkd.train.trainer import TrainConfig, recorded_config, train

from _cli import TINY_STUDENT
from store_factory import make_store
from store_factory import tiny_config as config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("records") / "pairs.zarr", n=8, num_points=160, shard_size=4)


def v3_config(config: dict) -> dict:
    """A config in the layout of version 3: no ``targets`` or ``target_shape`` (the default set's array)."""
    return {**config, "model": {k: v for k, v in config["model"].items() if k not in ("targets", "target_shape")}}


def as_v3(run):
    """Rewrite a run's config.json and last.pt in the layout version 3 wrote."""
    record = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "version": 3, "config": v3_config(record["config"])}))
    ckpt = load_checkpoint(run / LAST)
    atomic_save({**ckpt, "version": 3, "config": v3_config(ckpt["config"])}, run / LAST)


def v2_config(config: dict) -> dict:
    """A config in the layout of version 2: ``recon_weight`` beside the model, no ``local_pairing``, no
    ``subsample`` (and none of version 3's additions)."""
    config = v3_config(config)
    model = {k: v for k, v in config["model"].items() if k not in ("recon_weight", "local_pairing")}
    run = {k: v for k, v in config.items() if k != "subsample"}
    return {**run, "recon_weight": config["model"]["recon_weight"], "model": model}


def as_v2(run):
    """Rewrite a run's config.json and last.pt in the layout version 2 wrote."""
    record = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "version": 2, "config": v2_config(record["config"])}))
    ckpt = load_checkpoint(run / LAST)
    atomic_save({**ckpt, "version": 2, "config": v2_config(ckpt["config"])}, run / LAST)


def as_old_main(run):
    """Rewrite a run's config.json and last.pt in the layout an unversioned main wrote: no format or version, no
    ``streams`` (runs before it), ``num_workers`` and no ``rng_ranks`` in the checkpoint."""
    as_v2(run)
    record = json.loads((run / "config.json").read_text())
    del record["format"], record["version"], record["config"]["streams"]
    record["config"]["num_workers"] = record["config"].pop("loader_workers")
    (run / "config.json").write_text(json.dumps(record))
    ckpt = load_checkpoint(run / LAST)
    del ckpt["format"], ckpt["version"], ckpt["rng_ranks"], ckpt["config"]["streams"]
    ckpt["config"]["num_workers"] = ckpt["config"].pop("loader_workers")
    atomic_save(ckpt, run / LAST)


@pytest.mark.parametrize("layout", [as_old_main, as_v2, as_v3], ids=["unversioned", "v2", "v3"])
def test_a_run_of_the_old_layout_resumes_bit_identically_and_exports(store, tmp_path, layout):
    # runs of those layouts drew their points at random (``subsample`` came later)
    whole = train(config(store, max_steps=2, subsample="random"), tmp_path / "whole", progress=False)
    train(config(store, max_steps=2, stop_after=1, subsample="random"), tmp_path / "old", progress=False)
    layout(tmp_path / "old")
    saved = recorded_config(tmp_path / "old")
    assert saved.streams == 1 and saved.loader_workers == 0
    resumed = train(dataclasses.replace(saved, stop_after=None), tmp_path / "old", resume=True, progress=False)
    assert resumed["steps"] == 2 and resumed["final_loss"] == whole["final_loss"]
    a, b = load_checkpoint(tmp_path / "whole" / LAST), load_checkpoint(tmp_path / "old" / LAST)
    assert b["format"] == "pkd-distill-checkpoint" and b["version"] == runs.DISTILL_CHECKPOINT.version == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (
        "MAE_encoder.norm.weight"
        in torch.load(export_encoder(tmp_path / "old", tmp_path / "enc.pth"), weights_only=True)["base_model"]
    )


def test_a_version_2_run_reads_as_random_subsampling_and_resumes_bit_identically(store, tmp_path):
    whole = train(config(store, max_steps=2, subsample="random"), tmp_path / "whole", progress=False)
    train(config(store, max_steps=2, stop_after=1, subsample="random"), tmp_path / "v2", progress=False)
    record = json.loads((tmp_path / "v2" / "config.json").read_text())
    del record["config"]["subsample"]
    (tmp_path / "v2" / "config.json").write_text(
        json.dumps({**record, "version": 2, "config": v3_config(record["config"])})
    )
    ckpt = load_checkpoint(tmp_path / "v2" / LAST)
    del ckpt["config"]["subsample"]
    atomic_save({**ckpt, "version": 2, "config": v3_config(ckpt["config"])}, tmp_path / "v2" / LAST)
    saved = recorded_config(tmp_path / "v2")
    assert saved.subsample == "random" and TrainConfig(store="s").subsample == "fps"
    resumed = train(dataclasses.replace(saved, stop_after=None), tmp_path / "v2", resume=True, progress=False)
    assert resumed["steps"] == 2 and resumed["final_loss"] == whole["final_loss"]
    assert load_checkpoint(tmp_path / "v2" / LAST)["config"]["subsample"] == "random"


def test_unknown_keys_and_newer_versions_are_refused_naming_the_file(store, tmp_path):
    run = tmp_path / "run"
    train(config(store, max_steps=1), run, progress=False)
    record = json.loads((run / "config.json").read_text())
    assert (record["format"], record["version"]) == ("pkd-distill-run", 4)
    (run / "config.json").write_text(json.dumps({**record, "config": {**record["config"], "typo_lr": 1}}))
    with pytest.raises(ConfigError, match=r"config\.json does not match TrainConfig: unknown fields \['typo_lr'\]"):
        recorded_config(run)
    (run / "config.json").write_text(json.dumps({**record, "extra": 1}))
    with pytest.raises(
        ConfigError, match=r"config\.json is not a valid pkd-distill-run version 4 record \(unknown keys"
    ):
        recorded_config(run)
    (run / "config.json").write_text(json.dumps({**record, "version": 9}))
    with pytest.raises(
        ConfigError, match=r"is pkd-distill-run version 9 \(written by pkd .*\); this pkd reads versions 1-4"
    ):
        recorded_config(run)
    ckpt = load_checkpoint(run / LAST)
    atomic_save({**ckpt, "version": 5}, run / LAST)
    with pytest.raises(ConfigError, match=r"last\.pt is pkd-distill-checkpoint version 5"):
        train(config(store, max_steps=2), run, resume=True, progress=False)
    with pytest.raises(ConfigError, match="is a 'pkd-distill-run' record, not 'pkd-finetune-run'"):
        read_record(run / "config.json", runs.FINETUNE_RUN)


def test_a_later_module_declares_the_next_upgrade_step(tmp_path):
    kind = RecordKind("pkd-test", required=("config",))
    write_record(tmp_path / "v1.json", kind, {"config": {"a": 1, "gone": 2}})
    assert kind.version == 1

    @kind.step
    def _drop_gone(record):
        return {**record, "config": {k: v for k, v in record["config"].items() if k != "gone"}}

    assert kind.version == 2 and kind.upgrades == {1: _drop_gone}
    assert read_record(tmp_path / "v1.json", kind) == {"config": {"a": 1}}
    write_record(tmp_path / "v2.json", kind, {"config": {"a": 1}})
    assert json.loads((tmp_path / "v2.json").read_text())["version"] == 2
    (tmp_path / "old.json").write_text(json.dumps({"config": {}}))  # unversioned: version 1
    assert read_record(tmp_path / "old.json", kind) == {"config": {}}


def test_an_old_finetune_checkpoint_keeps_its_state_under_position():
    old = {"model": {}, "rng": {}, "state": {"step": 3}, "init_report": {}, "config": {}, "code": {}}
    new = runs.FINETUNE_CHECKPOINT.upgrade(old, "last.pt")
    assert new["position"] == {"step": 3} and "state" not in new
    version = runs.FINETUNE_CHECKPOINT.version
    with pytest.raises(ConfigError, match=rf"last\.pt is not a valid pkd-finetune-checkpoint version {version} record"):
        runs.FINETUNE_CHECKPOINT.upgrade({**old, "stray": 1}, "last.pt")


def test_finetune_records_before_v3_read_as_the_loop_they_trained_with():
    """v2 config.json / last.pt of ScanNet segmentation read as the interpolating head and AdamW, of ShapeNetPart
    as one optimizer step per batch; values a v3 record holds are kept; other benchmarks gain nothing."""
    assert runs.FINETUNE_RUN.version == runs.FINETUNE_CHECKPOINT.version == 3
    seg = {"task": "scannet-seg", "lr": 1e-3}
    record = {"format": "pkd-finetune-run", "version": 2, "config": seg, "init": {}, "data": {}, "code": {}}
    assert runs.FINETUNE_RUN.upgrade(record, "config.json")["config"] == {**seg, "head": "interp", "optimizer": "adamw"}
    ckpt = {"model": {}, "rng": {}, "position": {}, "init_report": {}, "code": {}, "version": 2}
    part = runs.FINETUNE_CHECKPOINT.upgrade({**ckpt, "config": {"task": "shapenetpart"}}, "last.pt")
    assert part["config"] == {"task": "shapenetpart", "double_step": False}
    assert runs.FINETUNE_CHECKPOINT.upgrade({**ckpt, "config": {"task": "modelnet40"}}, "last.pt")["config"] == {
        "task": "modelnet40"
    }
    new = {**record, "version": 3, "config": {**seg, "head": "concat", "optimizer": "adam"}}
    assert runs.FINETUNE_RUN.upgrade(new, "config.json")["config"] == new["config"]


@pytest.mark.parametrize(
    "variant, shape",
    [("distill", [10, 768]), ("clip-target", [512]), ("local", [49, 512]), ("recon", None)],
)
def test_a_run_before_target_sets_reads_as_the_clipcap_array_and_shape_it_trained_on(variant, shape):
    current = TrainConfig(store="s", model=StudentConfig(**TINY_STUDENT, variant=variant)).to_dict()
    old = v3_config(json.loads(json.dumps(current)))
    record = {"format": "pkd-distill-run", "version": 3, "config": old, "store": {}, "launch": {}, "code": {}}
    upgraded = runs.DISTILL_RUN.upgrade(record, "config.json")["config"]
    assert upgraded["model"]["targets"] is None and upgraded["model"]["target_shape"] == shape
    assert TrainConfig.from_dict(upgraded).model.target_name == (None if shape is None else upgraded_name(variant))
    assert upgrade_config(old) == upgraded  # an ablation table's (unversioned) config too
    assert upgrade_config(upgraded) == upgraded


def upgraded_name(variant: str) -> str:
    return {"distill": "clipcap/prefix", "clip-target": "clipcap/clip_embed", "local": "clipcap/patch_tokens"}[variant]
