"""The user-facing model: a network with its gene vocabulary, scaler and tokenizer, applied to
AnnData (scverse conventions: results are returned, and also written into the AnnData under
`key_added` unless `inplace=False`).

`exceiver.pretrain` and `exceiver.finetune` make models; `Exceiver.load` opens a model folder.
Label transfer, imputation, perturbation, dependencies and evaluation are functions of
`exceiver.tl` that take a model explicitly (`Exceiver.annotate` is label transfer's shortcut).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from exceiver.data.cells import CellCounts, align
from exceiver.data.counts import count_layers
from exceiver.data.preprocess import GeneScaler, ModelCells, prepare_cells
from exceiver.data.sources import H5adCells, h5ad_layers, h5ad_var, read_datasets
from exceiver.data.tokenizer import CellBatch, TokenizerConfig
from exceiver.data.vocab import GeneVocab
from exceiver.data.genemap import is_dataset_side, map_genes
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, ModelFileError, option, plain
from exceiver.inference import decode_values, iterate_latents
from exceiver.io import check_weights, h5ad_copy_with_obsm, load_model_files, save_model_files, write_h5ad
from exceiver.outputs import atomic_dir, claim
from exceiver.nn.config import ExceiverConfig, ObjectiveConfig, from_dict
from exceiver.nn.network import POOLINGS, ExceiverModule
from exceiver.nn.original import original_parts
from exceiver.version import __version__

log = logging.getLogger(__name__)


class Exceiver:
    """A trained Exceiver: network, gene vocabulary, scaler and tokenizer, applied to AnnData.

    gene_key, layer: where the training data held gene identifiers and raw counts; used for new
    data that has that var column / layer unless a call says otherwise.
    gene_map: the gene pairs (model gene, dataset gene) a model pretrained through a gene map
    carries for its vocabulary; data whose genes are the dataset side (mouse data, human+mouse
    model) is translated through it unless a call gives its own `gene_map`.

    Methods that read counts take `layer` (a layer name, or "raw" for adata.raw),
    `allow_non_integer` (accept counts that are mostly not integers, which are refused otherwise:
    log-normalised data is not counts) and `name` (the dataset's name in messages); `device` is
    checked before any data is read.
    """

    def __init__(self, module: ExceiverModule, vocab: GeneVocab, scaler: GeneScaler, tokenizer: TokenizerConfig, *,
                 objectives: ObjectiveConfig | None = None, training: dict | None = None,
                 metrics: dict | None = None, classes: Sequence[str] | None = None,
                 gene_key: str | None = None, layer: str | None = None, batches: dict | None = None,
                 gene_map: pd.DataFrame | None = None):
        if not len(vocab) == module.config.n_genes == len(scaler):
            raise ModelFileError(
                f"vocabulary ({len(vocab):,} genes), network ({module.config.n_genes:,}) and "
                f"scaler ({len(scaler):,}) disagree on the number of genes"
            )
        names = [] if classes is None else [str(c) for c in classes]
        n_classes = module.config.n_classes
        if len(names) != n_classes or len(set(names)) != n_classes:
            raise ModelFileError(f"the model has {n_classes} classes but {len(set(names))} unique class names")
        n_batches = len(batches["categories"]) if batches else 0
        if n_batches != module.config.n_batches:
            raise ModelFileError(f"the model has {module.config.n_batches} batches but {n_batches} batch names")
        self.module, self.vocab, self.scaler, self.tokenizer = module, vocab, scaler, tokenizer
        self.batches = batches
        self.objectives = objectives or ObjectiveConfig()
        self.classes = names or None
        self.training = training or {}
        self.metrics = metrics or {}
        self.gene_key, self.layer = gene_key, layer
        self.gene_map = gene_map

    @property
    def config(self) -> ExceiverConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        return (f"Exceiver({c.n_genes:,} genes, gene_dim={c.gene_dim}, {c.n_latents} latents x "
                f"{c.latent_dim}, {c.n_layers} layers, {self.module.n_parameters():,} parameters)")

    @classmethod
    def pretrained(cls, name: str) -> Exceiver:
        """A model shipped with exceiver, by name (docs/models.md), checked against its checksums."""
        from exceiver.shipped import shipped_folder

        return cls.load(shipped_folder(name))

    @classmethod
    def load(cls, path: str | Path) -> Exceiver:
        """Open a model folder (written by `save`, `pretrain` or `finetune`), or a shipped model by
        name (`Exceiver.pretrained`) where no folder of that name exists."""
        from exceiver.shipped import is_shipped_name, shipped_folder, shipped_names

        if is_shipped_name(path):
            path = shipped_folder(str(path))
        elif not Path(path).exists():
            raise ModelFileError(f"model folder {path} does not exist, and no shipped model has that name "
                                 f"(shipped: {', '.join(shipped_names()) or 'none'})")
        config, state_dict, vocab, scaler, metrics, gene_map = load_model_files(path)
        where = str(Path(path) / "config.json")
        for section, required in (("architecture", True), ("tokenizer", True), ("objectives", False), ("data", False)):
            if (required and section not in config) or not isinstance(config.get(section, {}), dict):
                raise ModelFileError(f"{where} has no valid '{section}' section")
        architecture = from_dict(ExceiverConfig, config["architecture"], where)
        tokenizer = from_dict(TokenizerConfig, config["tokenizer"], where)
        objectives = from_dict(ObjectiveConfig, config.get("objectives", {}), where)
        if architecture.paper_compatible != tokenizer.all_genes:
            raise ModelFileError(f"{where}: paper_compatible and the tokenizer's all_genes disagree")
        try:
            module = ExceiverModule(architecture)
        except ValueError as err:
            raise ModelFileError(f"{where}: invalid architecture ({err})") from err
        check_weights(module, state_dict, Path(path) / "model.safetensors")
        module.load_state_dict(state_dict, strict=True)
        bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ModelFileError(f"{Path(path) / 'model.safetensors'} holds non-finite weights in {bad[:3]}")
        module.eval()
        data = config.get("data") or {}
        batches = config.get("batches")
        if batches is not None and not (isinstance(batches, dict) and isinstance(batches.get("categories"), list)):
            raise ModelFileError(f"{where} has no valid 'batches' section")
        return cls(module, vocab, scaler, tokenizer, objectives=objectives, training=config.get("training"),
                   metrics=metrics, classes=config.get("classes"), gene_key=data.get("gene_key"),
                   layer=data.get("layer"), batches=batches, gene_map=gene_map)

    def fingerprint(self) -> str:
        """A digest of the weights (a resumed fine-tuning run must start from the same base)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write a model folder (atomically: it appears only when complete)."""
        with atomic_dir(path, overwrite=overwrite) as tmp:
            self.write(tmp)
        return Path(path)

    def write(self, folder: Path) -> None:
        """The model folder's files, into an existing folder."""
        config = {"exceiver_version": __version__, "architecture": self.config.to_dict(),
                  "tokenizer": self.tokenizer.to_dict(), "objectives": self.objectives.to_dict(),
                  "training": self.training, "data": {"gene_key": self.gene_key, "layer": self.layer}}
        if self.classes:
            config["classes"] = self.classes
        if self.batches:
            config["batches"] = self.batches
        save_model_files(folder, config=config, state_dict=self.module.state_dict(), vocab=self.vocab,
                         scaler=self.scaler, metrics=self.metrics, gene_map=self.gene_map)

    def cells(self, adata: ad.AnnData, *, gene_key: str | None = None, layer: str | None = None,
              name: str = "dataset", allow_non_integer: bool = False) -> CellCounts:
        """Align a dataset to the model's genes and check its counts; every cell must have counts
        in genes the model saw expressed in training (others have untrained embeddings)."""
        gene_key, layer = self.data_keys(adata.var.columns, count_layers(adata), gene_key, layer)
        return prepare_cells(align(adata, self.vocab, gene_key=gene_key, layer=layer, name=name,
                                   allow_non_integer=allow_non_integer), name,
                             genes=self.scaler.trained_genes, empty="refuse")

    def data_keys(self, var_columns, layers, gene_key: str | None, layer: str | None) -> tuple[str | None, str | None]:
        """The gene key and layer of a call, else the model's own where the data has them;
        `gene_key="var_names"` and `layer="X"` ask for the defaults whatever the model remembers."""
        if gene_key is None and self.gene_key in var_columns:
            gene_key = self.gene_key
        if layer is None and self.layer in layers:
            layer = self.layer
        return (None if gene_key == "var_names" else gene_key), (None if layer == "X" else layer)

    @torch.inference_mode()
    def embed(self, adata: ad.AnnData, *, key_added: str = "X_exceiver", pooling: str | None = None,
              inplace: bool = True, gene_key: str | None = None, layer: str | None = None,
              batch_size: int | None = None, device: str | None = None, num_workers: int = 0,
              gene_map: str | Path | pd.DataFrame | None = None, allow_non_integer: bool = False,
              name: str = "dataset", progress: bool = True) -> np.ndarray:
        """Cell embeddings [cells, width]: the cell bottleneck ("bottleneck", the default of models
        that have one), the mean of the processed latents ("mean", the default of others) or all of
        them flattened ("flatten", the original's); also written to `adata.obsm[key_added]` (with
        the settings in `adata.uns["exceiver"][key_added]`) unless `inplace=False`. `gene_map`
        translates the dataset's genes into the model's first (e.g. mouse data, human model:
        `exceiver.data.genemap`)."""
        pooling = check_pooling(pooling, self.module)
        embedding = np.empty((adata.n_obs, self.module.embedding_width(pooling)), dtype=np.float32)
        for batch, latents in self._latents(adata, gene_key, layer, batch_size, device, progress, "embedding",
                                            num_workers, allow_non_integer, name, gene_map):
            embedding[batch.cells.cpu().numpy()] = self.module.pool(latents, pooling).float().cpu().numpy()
        if inplace:
            adata.obsm[key_added] = embedding
            adata.uns.setdefault("exceiver", {})[key_added] = {"pooling": pooling, "n_genes": len(self.vocab)}
        return embedding

    @torch.inference_mode()
    def embed_file(self, path: str | Path, out: str | Path, *, key_added: str = "X_exceiver", pooling: str | None = None,
                   gene_key: str | None = None, layer: str | None = None, batch_size: int | None = None,
                   device: str | None = None, num_workers: int = 0, gene_map: str | Path | None = None,
                   overwrite: bool = False, allow_non_integer: bool = False, progress: bool = True) -> Path:
        """`embed` from an .h5ad file to a copy of it with `obsm[key_added]` added, streaming:
        neither the counts nor the embeddings are ever all in memory (with a `gene_map` the
        file is read into memory, to be translated)."""
        device = inference_device(device)
        pooling = check_pooling(pooling, self.module)
        with claim(out, overwrite=overwrite, folder=False):  # refused now, not after the work
            if gene_map is not None or self._translates(h5ad_var(path).var, gene_key):
                [(name, adata)] = read_datasets(path)
                self.embed(adata, key_added=key_added, pooling=pooling, gene_key=gene_key, layer=layer,
                           batch_size=batch_size, device=device, num_workers=num_workers, gene_map=gene_map,
                           allow_non_integer=allow_non_integer, name=name, progress=progress)
                write_h5ad(adata, out, overwrite=overwrite)
                return Path(out)
            gene_key, layer = self.data_keys(h5ad_var(path).var.columns, h5ad_layers(path), gene_key, layer)
            cells = H5adCells(path, self.vocab, gene_key=gene_key, layer=layer, allow_non_integer=allow_non_integer)
            self._embed_cells(cells, path, out, key_added, pooling, batch_size, device, num_workers, overwrite,
                              progress)
        return Path(out)

    def _embed_cells(self, cells: H5adCells, path, out, key_added: str, pooling: str, batch_size: int | None,
                     device: str | None, num_workers: int, overwrite: bool, progress: bool) -> None:
        width = self.module.embedding_width(pooling)
        with self.on_device(device) as on, \
                h5ad_copy_with_obsm(path, out, key_added, (cells.n_cells, width), overwrite=overwrite) as write:
            for batch, latents in iterate_latents(
                    self.module, cells, self.scaler, self.tokenizer, batch_size=batch_size, device=on,
                    num_workers=num_workers, progress=progress, desc="embedding",
                    prepare=ModelCells(self.scaler.trained_genes, cells.name)):
                write(batch.cells.cpu().numpy(), self.module.pool(latents, pooling).float().cpu().numpy())
            write.uns({"pooling": pooling, "n_genes": len(self.vocab)})

    @torch.inference_mode()
    def predict_values(self, adata: ad.AnnData, query_genes: Sequence[str] | None = None, *,
                       gene_key: str | None = None, layer: str | None = None, batch_size: int | None = None,
                       device: str | None = None, allow_non_integer: bool = False, name: str = "dataset",
                       progress: bool = True) -> np.ndarray:
        """The decoder's predicted value of each query gene in each cell, from the cell's tokens
        (nothing masked; cells with more than `max_tokens` expressed genes are subsampled as in
        `embed`), in the model's value space (z-score + 1, or log-normalised expression for models with
        `values="log"`; `scaler.log_expression` maps either back): [cells, query genes].
        query_genes: vocabulary genes to predict (default: all, in vocabulary order)."""
        if query_genes is None:
            ids = np.arange(len(self.vocab))
        else:
            ids = self.vocab.ids(list(query_genes))
            if (ids < 0).any():
                unknown = [str(g) for g, i in zip(query_genes, ids) if i < 0]
                raise ExceiverInputError(f"{len(unknown)} query genes are not in the model's vocabulary, "
                                         f"e.g. {plain(unknown[:3])}")
        out = np.empty((adata.n_obs, len(ids)), dtype=np.float32)
        query = torch.from_numpy(ids)
        for batch, latents in self._latents(adata, gene_key, layer, batch_size, device, progress, "predicting",
                                            allow_non_integer=allow_non_integer, name=name):
            out[batch.cells.cpu().numpy()] = decode_values(self.module, latents, query.to(latents.device)).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def predict_logits(self, adata: ad.AnnData, *, gene_key: str | None = None, layer: str | None = None,
                       batch_size: int | None = None, device: str | None = None, allow_non_integer: bool = False,
                       name: str = "dataset", progress: bool = True) -> np.ndarray:
        """Class-token logits [cells, classes] (columns: `self.classes`)."""
        if self.module.class_head is None:
            raise ExceiverInputError("this model has no class head: it predicts expression, not classes")
        logits = np.empty((adata.n_obs, self.config.n_classes), dtype=np.float32)
        for batch, latents in self._latents(adata, gene_key, layer, batch_size, device, progress, "classifying",
                                            allow_non_integer=allow_non_integer, name=name):
            logits[batch.cells.cpu().numpy()] = self.module.class_logits(latents).float().cpu().numpy()
        return logits

    def predict_proba(self, adata: ad.AnnData, *, gene_key: str | None = None, layer: str | None = None,
                      batch_size: int | None = None, device: str | None = None, allow_non_integer: bool = False,
                      name: str = "dataset", progress: bool = True) -> np.ndarray:
        """Class probabilities [cells, classes] (softmax of the logits; columns: `self.classes`)."""
        logits = self.predict_logits(adata, gene_key=gene_key, layer=layer, batch_size=batch_size, device=device,
                                     allow_non_integer=allow_non_integer, name=name, progress=progress)
        return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()

    def predict(self, adata: ad.AnnData, *, key_added: str = "exceiver_prediction", inplace: bool = True,
                gene_key: str | None = None, layer: str | None = None, batch_size: int | None = None,
                device: str | None = None, allow_non_integer: bool = False, name: str = "dataset",
                progress: bool = True) -> pd.Series:
        """Predicted class of each cell, returned; also written to `obs[key_added]`, with the class
        probabilities in `obsm["exceiver_probabilities"]` (columns: `uns["exceiver_classes"]`;
        "exceiver" is `key_added` without its "_prediction" suffix), unless `inplace=False`."""
        proba = self.predict_proba(adata, gene_key=gene_key, layer=layer, batch_size=batch_size, device=device,
                                   allow_non_integer=allow_non_integer, name=name, progress=progress)
        prefix = key_added.removesuffix("_prediction")
        classes = np.asarray(self.classes)
        prediction = pd.Series(pd.Categorical(classes[proba.argmax(1)], categories=classes),
                               index=adata.obs_names, name=key_added)
        if inplace:
            adata.obs[key_added] = prediction
            adata.obsm[f"{prefix}_probabilities"] = proba.astype(np.float32)
            adata.uns[f"{prefix}_classes"] = classes
        return prediction

    def annotate(self, reference: ad.AnnData | str | Path, query: ad.AnnData | str | Path, label_key: str,
                 **options) -> pd.DataFrame:
        """Transfer `reference.obs[label_key]` to the query's cells through this model's cell
        embedding (logistic regression by default): `obs["exceiver_label"]` and `obs["exceiver_label_confidence"]`
        written to the query unless `inplace=False`, and returned. Options: `exceiver.tl.annotate`."""
        from exceiver.tl.annotation import annotate

        return annotate(self, reference, query, label_key, **options)

    def in_model_genes(self, adata: ad.AnnData, gene_key: str | None, layer: str | None,
                       gene_map: str | Path | pd.DataFrame | None = None, name: str = "dataset",
                       ) -> tuple[ad.AnnData, str | None, str | None]:
        """(data, gene key, layer) to read a dataset by: as it is, or translated through `gene_map`
        or, where its genes are the dataset side of the model's own map (mouse genes), that."""
        if gene_map is None and not self._translates(adata.var, gene_key):
            return adata, gene_key, layer
        gene_key, layer = self.data_keys(adata.var.columns, count_layers(adata), gene_key, layer)
        log.info("%s: translated into the model's genes through %s", name, "its gene map" if gene_map is None else "a gene map")
        adata = map_genes(adata, self.gene_map if gene_map is None else gene_map, gene_key=gene_key, layer=layer,
                          name=name)
        return adata, "var_names", "X"

    def _translates(self, var: pd.DataFrame, gene_key: str | None) -> bool:
        key = gene_key if gene_key in var.columns else (self.gene_key if self.gene_key in var.columns else None)
        return self.gene_map is not None and is_dataset_side(self.gene_map, var.index if key is None else var[key])

    def gene_embeddings(self) -> pd.DataFrame:
        """The learned gene embedding of every vocabulary gene (rows indexed by gene)."""
        weights = self.module.gene_emb.weight.detach().cpu().numpy()[: len(self.vocab)]
        columns = [f"dim_{i}" for i in range(weights.shape[1])]
        return pd.DataFrame(weights, index=pd.Index(self.vocab.genes, name="gene"), columns=columns)

    @contextlib.contextmanager
    def on_device(self, device: str | None) -> Iterator[torch.device]:
        """Run on `device` (see `exceiver.devices.inference_device`) and leave the network where the
        user had it afterwards."""
        target = inference_device(device)
        home = next(self.module.parameters()).device
        with torch.inference_mode(False):  # moved weights must stay usable by autograd afterwards
            self.module.to(target)
        try:
            yield target
        finally:
            with torch.inference_mode(False):
                self.module.to(home)

    def _latents(self, adata: ad.AnnData, gene_key: str | None = None, layer: str | None = None,
                 batch_size: int | None = None, device: str | None = None, progress: bool = True,
                 desc: str = "cells", num_workers: int = 0, allow_non_integer: bool = False,
                 name: str = "dataset", gene_map: str | Path | pd.DataFrame | None = None,
                 ) -> Iterator[tuple[CellBatch, torch.Tensor]]:
        """(batch, processed latents) over the cells of `adata`, in batches on the chosen device
        (checked before the data is read); a backed AnnData (`read_h5ad(path, backed="r")`) is read
        from disk chunk by chunk. Translated through `gene_map`, or the model's own where the
        data's genes are its dataset side."""
        device = inference_device(device)
        adata, gene_key, layer = self.in_model_genes(adata, gene_key, layer, gene_map, name)
        if adata.isbacked:
            gene_key, layer = self.data_keys(adata.var.columns, h5ad_layers(adata.filename), gene_key, layer)
            cells = H5adCells(adata.filename, self.vocab, gene_key=gene_key, layer=layer,
                              name=Path(adata.filename).stem, allow_non_integer=allow_non_integer)
        else:
            cells = self.cells(adata, gene_key=gene_key, layer=layer, name=name, allow_non_integer=allow_non_integer)
        with self.on_device(device) as on:
            yield from iterate_latents(self.module, cells, self.scaler, self.tokenizer, batch_size=batch_size,
                                       device=on, num_workers=num_workers, progress=progress, desc=desc,
                                       prepare=ModelCells(self.scaler.trained_genes, getattr(cells, "name", name)))


def import_original(ckpt_path: str | Path, genes: str | Path | Sequence[str] | None = None,
                    scaler: str | Path | None = None) -> Exceiver:
    """An Exceiver from a checkpoint of the original release, computing exactly as the original
    code (see `exceiver.nn.original.original_parts` for `genes` and `scaler`)."""
    module, tokenizer, vocab, gene_scaler, training, classes = original_parts(ckpt_path, genes, scaler)
    return Exceiver(module, vocab, gene_scaler, tokenizer, training=training, classes=classes)


def check_pooling(pooling: str | None, module: ExceiverModule) -> str:
    """The pooling to use: `module`'s default for None; refuses unknown ones and a bottleneck that
    the model does not have."""
    if pooling is None:
        return module.default_pooling
    if pooling not in POOLINGS:
        raise ExceiverInputError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    if pooling == "bottleneck" and module.bottleneck is None:
        raise ExceiverInputError(f"this model has no cell bottleneck: use {option('pooling', 'mean')} or "
                                 f"{option('pooling', 'flatten')}")
    return pooling
