"""The training variants (paper Tables 5 and 6) and the one objective config that chooses and weights them.

A ``Variant`` is composed of what it reads from the store, the head its student predicts with
(``pkd.train.heads``) and the loss terms it sums (``pkd.train.loss_terms``); nothing dispatches on its name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pkd.common.config import option
from pkd.common.errors import ConfigError
from pkd.common.store import DEFAULT_SET, parse_target, target_path
from pkd.train.heads import ConceptHead, Head, PooledHead, TokenHead
from pkd.train.loss_terms import LOCAL_PAIRINGS, LocalAlignment, LossTerm, MaskedChamfer, TargetMSE


@dataclass(frozen=True)
class Variant:
    """What a training variant reads from the store, how its student predicts and what its loss sums."""

    target: str | None  # store array the head regresses (in a split: ``target_path``), None for pure reconstruction
    head: Head | None
    losses: tuple[LossTerm, ...]
    measure: str  # what its loss measures, ``{target}`` standing for ``target_label`` (see ``objective``)
    extra_arrays: tuple[str, ...] = ()
    target_label: str = ""  # what ``target`` holds, in words (``SET/ARRAY`` once retargeted)

    @property
    def objective(self) -> str:
        """What its loss measures (losses of different objectives are not comparable): "prefix MSE"."""
        return self.measure.format(target=self.target_label)

    @property
    def arrays(self) -> tuple[str, ...]:
        """Store arrays a loader must read for this variant."""
        return ("points",) + ((self.target,) if self.target else ()) + self.extra_arrays

    @property
    def recon(self) -> bool:
        """Whether it reconstructs masked patches (its student builds ``MAE_decoder``)."""
        return any(term.masked for term in self.losses)

    @property
    def needs_crop(self) -> bool:
        """Whether its loss needs the teacher's crop of the pixels (``pkd.common.store.teacher_crop``)."""
        return any(term.needs_crop for term in self.losses)

    def retarget(self, path: str, label: str) -> Variant:
        """This variant regressing the store array ``path`` (``label``: its ``SET/ARRAY`` name) instead, its loss
        terms that read a target too."""
        losses = tuple(term.retarget(path) for term in self.losses)
        return replace(self, target=path, losses=losses, target_label=label)


VARIANTS: dict[str, Variant] = {
    "distill": Variant("prefix", ConceptHead(), (TargetMSE("prefix"),), "{target} MSE", target_label="prefix"),
    "no-concept": Variant("prefix", PooledHead(), (TargetMSE("prefix"),), "{target} MSE", target_label="prefix"),
    "clip-target": Variant(
        "clip_embed", ConceptHead(), (TargetMSE("clip_embed"),), "{target} MSE", target_label="CLIP-embedding"
    ),
    "local": Variant(
        "patch_tokens", TokenHead(), (LocalAlignment(),), "{target} cosine", ("pixels", "in_view"), "patch-token"
    ),
    "recon": Variant(None, None, (MaskedChamfer(),), "Chamfer-L2"),
    "recon+distill": Variant(
        "prefix",
        ConceptHead(),
        (TargetMSE("prefix"), MaskedChamfer()),
        "{target} MSE + w·Chamfer-L2",
        target_label="prefix",
    ),
}


def variant_spec(name: str) -> Variant:
    """The Variant called ``name``; ConfigError naming the choices for an unknown one."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}.")
    return VARIANTS[name]


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """What a student is trained to do: the variant, its reconstruction mask and its loss settings.

    A base class of ``StudentConfig`` (as ``EncoderConfig`` is), so run records keep one flat ``model`` section.
    """

    variant: str = option("distill", "distill | no-concept | clip-target | local | recon | recon+distill")
    mask_ratio: float = option(0.6, "fraction of patches masked for reconstruction")
    recon_weight: float = option(1.0, "weight of the reconstruction loss in recon+distill")
    local_pairing: str = option(
        "patch",
        "local: patch pairs each 2D teacher patch with the nearest projected 3D centre (paper); "
        "centre pairs each 3D centre with the patch its pixel falls in",
    )
    targets: str | None = option(
        None,
        f"SET/ARRAY of the store the head regresses (default: the variant's own array of the {DEFAULT_SET} set, "
        "e.g. clipcap/prefix); `pkd-prep info STORE` lists the sets",
    )
    target_shape: tuple[int, ...] | None = None  # sample shape of the array trained on: the trainer reads it

    def __post_init__(self) -> None:
        base = variant_spec(self.variant)
        if self.targets is not None:
            parse_target(self.targets)
            if base.target is None:
                raise ConfigError(
                    f"--variant {self.variant} regresses no teacher target; drop --targets {self.targets} "
                    "or choose a variant that distils."
                )
        if self.target_shape is not None:
            for term in self.spec.losses:
                term.check_target(tuple(self.target_shape), f"--targets {self.target_name}")
        if self.local_pairing not in LOCAL_PAIRINGS:
            raise ConfigError(
                f"unknown local pairing {self.local_pairing!r}; choose one of {', '.join(LOCAL_PAIRINGS)}."
            )
        if self.recon_weight < 0:
            raise ConfigError(f"--recon-weight {self.recon_weight} must be at least 0.")

    @property
    def target(self) -> tuple[str, str] | None:
        """(set, array) the head regresses: ``targets``, else the variant's own array of the default set; None for
        a variant without a target."""
        if self.targets is not None:
            return parse_target(self.targets)
        base = variant_spec(self.variant).target
        return None if base is None else (DEFAULT_SET, base)

    @property
    def target_name(self) -> str | None:
        """``SET/ARRAY`` of ``target`` as ``--targets`` spells it."""
        return None if self.target is None else "/".join(self.target)

    @property
    def spec(self) -> Variant:
        """The Variant this config trains, its terms pointing at the store path of ``targets`` where it names one."""
        base = variant_spec(self.variant)
        if self.targets is None:
            return base
        return base.retarget(target_path(*parse_target(self.targets)), self.targets)

    def weight(self, term: LossTerm) -> float:
        """The weight of ``term`` in the total loss: ``recon_weight`` for the reconstruction term of a variant that
        also regresses a target, else 1."""
        return self.recon_weight if term.masked and len(self.spec.losses) > 1 else 1.0
