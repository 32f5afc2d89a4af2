"""Import the original authors' released checkpoints (PyTorch Lightning, Connell et al. 2022).

The checkpoints are pickles. They are read with `torch.load(weights_only=True)`, whose unpickler
builds only tensors and plain containers, plus one allow-listed name: `pathlib.PosixPath` (found in
the hyper-parameters), rebuilt as a plain string. Anything else in the file is refused.
The weights map one to one onto a `paper_compatible` ExceiverModule (see docs/original.md).
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import TokenizerConfig
from exceiver.data.vocab import GeneVocab, read_gene_list
from exceiver.errors import ModelFileError, option
from exceiver.nn.config import ExceiverConfig
from exceiver.nn.network import ExceiverModule

log = logging.getLogger(__name__)

ORIGINAL_CROSS_HEADS = 4  # the original's CrossAttn always used its default of 4 heads
_HPARAMS = ("seq_len", "seq_dim", "query_len", "query_dim", "num_layers", "nhead", "dim_feedforward")


def _path_string(*parts: str) -> str:
    """Stand-in for pathlib.PosixPath while unpickling: joins the parts, runs nothing else."""
    return str(PurePosixPath(*(str(p) for p in parts)))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, hyper_parameters) of an original checkpoint, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} does not exist")
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):  # allow-list renaming
        raise ModelFileError(f"importing original checkpoints needs torch>=2.6 (found {torch.__version__})")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a PyTorch checkpoint (not a zip archive; corrupt or truncated?)")
    try:  # torch does not verify the archive's checksums: a flipped byte in a tensor would load
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, ValueError) as err:
        raise ModelFileError(f"{path} is corrupt or truncated ({_first_line(err)})") from err
    if bad is not None:
        raise ModelFileError(f"{path} is corrupt: {bad} fails its checksum")
    try:
        with torch.serialization.safe_globals([(_path_string, "pathlib.PosixPath")]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise ModelFileError(
            f"{path} was refused: it holds {what}; only tensors, plain containers and pathlib paths "
            "are read, because unpickling other objects can run arbitrary code"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ModelFileError(f"{path} is corrupt or truncated ({_first_line(err)})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ModelFileError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = checkpoint.get("hyper_parameters")
    missing = [k for k in _HPARAMS if not isinstance(hparams, dict) or k not in hparams]
    if missing or "gene_emb.weight" not in checkpoint["state_dict"]:
        raise ModelFileError(f"{path} is not an original Exceiver checkpoint (missing {missing or 'gene_emb.weight'})")
    return checkpoint["state_dict"], hparams


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def original_config(hparams: dict, state_dict: dict[str, torch.Tensor]) -> ExceiverConfig:
    """The paper-compatible ExceiverConfig of an original checkpoint."""
    head = state_dict.get("mlp_classify.3.weight")
    n_classes = 0 if head is None else int(head.shape[0])
    if head is not None and int(hparams.get("classify_dim") or n_classes) != n_classes:
        raise ValueError(f"classify_dim {hparams.get('classify_dim')} disagrees with the head's {n_classes} classes")
    return ExceiverConfig(
        n_genes=int(hparams["seq_len"]), gene_dim=int(hparams["seq_dim"]), n_latents=int(hparams["query_len"]),
        latent_dim=int(hparams["query_dim"]), n_layers=int(hparams["num_layers"]), n_heads=int(hparams["nhead"]),
        cross_heads=ORIGINAL_CROSS_HEADS, ff_dim=int(hparams["dim_feedforward"]), cross_ff_mult=1, head_hidden=1,
        dropout=float(hparams.get("dropout") or 0.0), n_classes=n_classes, paper_compatible=True,
    )


def original_tokenizer(hparams: dict) -> TokenizerConfig:
    """The original's input: every measured gene a token, its masking fraction."""
    return TokenizerConfig(mask_fraction=float(hparams.get("frac", 0.15)), all_genes=True)


def map_weights(original: dict[str, torch.Tensor], config: ExceiverConfig) -> dict[str, torch.Tensor]:
    """Rename (and split or pad) the original's weights into our module's state dict."""
    out: dict[str, torch.Tensor] = {}
    d_lat, d_gene = config.latent_dim, config.gene_dim
    out["latents"] = original["query_emb"]
    emb = original["gene_emb.weight"]
    rows = config.n_genes + 2  # + padding row + class-token row
    if emb.shape[0] < rows:  # the masked-expression model has no class-token row
        emb = torch.cat([emb, emb.new_zeros(rows - emb.shape[0], emb.shape[1])])
    out["gene_emb.weight"] = emb
    for ours, theirs, dim in (("encoder", "encoder_cross_attn", d_lat), ("decoder", "decoder_cross_attn", d_gene)):
        _cross_attention(original, out, ours, theirs, dim)
    for i in range(config.n_layers):
        src, dst = f"process_self_attn.transformer.layers.{i}.", f"processor.{i}."
        pairs = {"self_attn.in_proj_weight": "attn.qkv.weight", "self_attn.in_proj_bias": "attn.qkv.bias",
                 "self_attn.out_proj.weight": "attn.out.weight", "self_attn.out_proj.bias": "attn.out.bias",
                 "linear1.weight": "ff.0.weight", "linear1.bias": "ff.0.bias",
                 "linear2.weight": "ff.3.weight", "linear2.bias": "ff.3.bias",
                 "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
                 "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}
        out.update({dst + b: original[src + a] for a, b in pairs.items()})
    for i in (0, 1, 3):
        for kind in ("weight", "bias"):
            out[f"value_head.{i}.{kind}"] = original[f"mlp.{i}.{kind}"]
            if config.n_classes:
                out[f"class_head.{i}.{kind}"] = original[f"mlp_classify.{i}.{kind}"]
    return out


def _original_names(state_dict: dict[str, torch.Tensor], config: ExceiverConfig) -> set[str]:
    """The original weight names that `map_weights` reads for this config."""
    layers = tuple(f"process_self_attn.transformer.layers.{i}." for i in range(config.n_layers))
    prefixes = ("encoder_cross_attn.", "decoder_cross_attn.", "mlp.") + layers
    if config.n_classes:
        prefixes += ("mlp_classify.",)
    return {k for k in state_dict if k.startswith(prefixes)} | {"query_emb", "gene_emb.weight"}


def _cross_attention(original: dict, out: dict, ours: str, theirs: str, dim: int) -> None:
    """nn.MultiheadAttention (packed or separate q/k/v projections) -> our q and kv Linears."""
    attn = f"{theirs}.cross_attn."
    if attn + "in_proj_weight" in original:
        w = original[attn + "in_proj_weight"]
        q_w, kv_w = w[:dim], w[dim:]
    else:
        q_w = original[attn + "q_proj_weight"]
        kv_w = torch.cat([original[attn + "k_proj_weight"], original[attn + "v_proj_weight"]])
    bias = original[attn + "in_proj_bias"]
    out.update({
        f"{ours}.attn.q.weight": q_w, f"{ours}.attn.q.bias": bias[:dim],
        f"{ours}.attn.kv.weight": kv_w, f"{ours}.attn.kv.bias": bias[dim:],
        f"{ours}.attn.out.weight": original[attn + "out_proj.weight"],
        f"{ours}.attn.out.bias": original[attn + "out_proj.bias"],
        f"{ours}.norm_q.weight": original[f"{theirs}.layernorm_q.weight"],
        f"{ours}.norm_q.bias": original[f"{theirs}.layernorm_q.bias"],
        f"{ours}.norm_kv.weight": original[f"{theirs}.layernorm_kv.weight"],
        f"{ours}.norm_kv.bias": original[f"{theirs}.layernorm_kv.bias"],
    })
    for i in (0, 1, 3, 4):  # LayerNorm, Linear, (GELU), LayerNorm, Linear
        for kind in ("weight", "bias"):
            out[f"{ours}.ff.{i}.{kind}"] = original[f"{theirs}.mlp.{i}.{kind}"]


def read_scaler(path: str | Path, n_genes: int) -> GeneScaler:
    """The original's StandardScaler as an .npz with `mean` and `scale` (one value per gene)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("mean", "scale") if k not in f.files]
            if missing:
                raise ModelFileError(f"scaler {path} lacks the array(s) {missing} (it has {f.files})")
            mean, scale = (np.asarray(f[k], dtype=np.float64) for k in ("mean", "scale"))
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ModelFileError(f"cannot read scaler {path} as an .npz of arrays ({err})") from err
    for name, a in (("mean", mean), ("scale", scale)):
        if a.shape != (n_genes,):
            raise ModelFileError(f"scaler {path}: '{name}' has shape {a.shape}, the checkpoint has {n_genes:,} genes")
    if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
        raise ModelFileError(f"scaler {path}: 'mean' and 'scale' must be finite, 'scale' positive")
    return imported_scaler(mean, scale)


def imported_scaler(mean: np.ndarray, scale: np.ndarray) -> GeneScaler:
    """A scaler with given statistics; the original's cell counts are unknown (left at 0)."""
    zeros = np.zeros(len(mean), dtype=np.int64)
    return GeneScaler(np.asarray(mean, np.float32), np.asarray(scale, np.float32), zeros,
                      np.zeros(len(mean), dtype=np.float32), zeros.copy())


def original_parts(ckpt_path: str | Path, genes: str | Path | Sequence[str] | None = None,
                   scaler: str | Path | None = None,
                   ) -> tuple[ExceiverModule, TokenizerConfig, GeneVocab, GeneScaler, dict, list[str] | None]:
    """The parts of an Exceiver from an original checkpoint, computing exactly as the original code:
    (network, tokenizer, vocabulary, scaler, training record, class names), which
    `exceiver.import_original` assembles into a model.

    genes: the checkpoint's gene order (file, one gene per line, or a list). The released order is
        not recoverable: without it genes are named gene_00000, ... and the model cannot be applied
        to real data by gene name.
    scaler: .npz with the original StandardScaler's `mean` and `scale` per gene; without it values
        are log-normalised expression + 1, not z-scored.
    """
    state_dict, hparams = read_checkpoint(ckpt_path)
    try:
        config = original_config(hparams, state_dict)
        module = ExceiverModule(config)
        mapped = map_weights(state_dict, config)
        module.load_state_dict(mapped, strict=True)
        used = _original_names(state_dict, config)
        extra = [k for k in state_dict if k not in used and not k.startswith("process_self_attn.encoder_layer.")]
        if extra:  # e.g. more layers than num_layers says
            raise ValueError(f"weights the model would not use: {extra[:3]}")
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise ModelFileError(f"{ckpt_path} does not have the original Exceiver's weights ({_first_line(err)})") from err
    n = config.n_genes
    if genes is None:
        log.warning("no gene list given: genes are named gene_00000 ... gene_%05d. The released gene order "
                    "is not recoverable, so this model cannot be applied to real data by gene name until a "
                    "gene list is given (%s)", n - 1, option("genes"))
        names = [f"gene_{i:05d}" for i in range(n)]
    else:
        names = read_gene_list(genes) if isinstance(genes, (str, Path)) else list(genes)
        if len(names) != n:
            raise ModelFileError(f"the gene list has {len(names):,} genes, the checkpoint {n:,}")
    vocab = GeneVocab(names)
    if scaler is None:
        log.warning("no scaler given: token values are log-normalised expression + 1, not z-scored as in "
                    "the original's training (pass %s with the original StandardScaler's mean/scale)", option("scaler"))
        gene_scaler = imported_scaler(np.zeros(n), np.ones(n))
    else:
        gene_scaler = read_scaler(scaler, n)
    module.eval()
    classes = [f"class_{i:02d}" for i in range(config.n_classes)] if config.n_classes else None
    training = {"imported_from": str(Path(ckpt_path).name), "original_hyper_parameters":
                {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool)) or v is None},
                "scaler": "given" if scaler is not None else "none (identity)",
                "genes": "given" if genes is not None else "placeholder names"}
    return module, original_tokenizer(hparams), vocab, gene_scaler, training, classes
