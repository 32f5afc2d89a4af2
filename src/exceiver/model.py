"""The user-facing model: a network with its gene vocabulary, scaler and tokenizer, applied to
AnnData (scverse conventions: results are returned, and also written into the AnnData under
`key_added` unless `inplace=False`).

`exceiver.pretrain` and `exceiver.finetune` make models; `Exceiver.load` opens a model folder.
Label transfer, imputation, perturbation, dependencies and evaluation are functions of
`exceiver.tl` that take a model explicitly (`Exceiver.annotate` is label transfer's shortcut);
they need of it only what `exceiver.inference.CellModel` names.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from typing_extensions import Unpack

from exceiver.data.cells import CellCounts
from exceiver.data.contract import DataContract, ModelCells, ReadingOptions, read_dataset
from exceiver.data.genemap import GenePairs
from exceiver.data.preprocess import GeneScaler
from exceiver.data.sources import h5ad_var
from exceiver.data.tokenizer import TokenizerConfig
from exceiver.data.vocab import GeneVocab
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, ModelFileError
from exceiver.inference import (
    cell_embedding,
    cell_latents,
    check_pooling,
    decoded_values,
    gene_embedding_table,
    on_device,
    record,
)
from exceiver.io import check_weights, h5ad_copy_with_obsm, load_model_files, save_model_files
from exceiver.outputs import atomic_dir, claim
from exceiver.nn.config import ExceiverConfig, ObjectiveConfig, from_dict
from exceiver.nn.network import ExceiverModule
from exceiver.nn.original import original_parts
from exceiver.version import __version__

log = logging.getLogger(__name__)


class Exceiver:
    """A trained Exceiver: network, gene vocabulary, scaler and tokenizer, applied to AnnData.

    Every method that takes cells reads them through `read`, which applies the model's data
    contract (`self.contract`, `exceiver.data.contract`): gene_key and layer where the training
    data held gene identifiers and raw counts (used for new data that has that var column /
    layer), the gene pairs (model gene, dataset gene) a model pretrained through a gene map
    carries (data whose genes are their dataset side, e.g. mouse data for a human+mouse model, is
    translated through them), and the non-integer policy. A call overrides any of them with the
    reading options `gene_key`, `layer`, `gene_map`, `allow_non_integer` and `name`
    (`exceiver.data.contract.ReadingOptions`); `device` is checked before any data is read.
    """

    def __init__(self, module: ExceiverModule, vocab: GeneVocab, scaler: GeneScaler, tokenizer: TokenizerConfig, *,
                 objectives: ObjectiveConfig | None = None, training: dict | None = None,
                 metrics: dict | None = None, classes: Sequence[str] | None = None,
                 gene_key: str | None = None, layer: str | None = None, batches: dict | None = None,
                 gene_map: pd.DataFrame | None = None, allow_non_integer: bool = False):
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
        pairs = GenePairs.of(gene_map)
        self.contract = DataContract(gene_key, layer, None if pairs is None else pairs.within(vocab.genes),
                                     allow_non_integer)

    @property
    def gene_key(self) -> str | None:
        return self.contract.gene_key

    @property
    def layer(self) -> str | None:
        return self.contract.layer

    @property
    def allow_non_integer(self) -> bool:
        return self.contract.allow_non_integer

    @property
    def gene_map(self) -> pd.DataFrame | None:
        """The (model_gene, data_gene) pairs the model carries, or None."""
        return None if self.contract.gene_map is None else self.contract.gene_map.table

    @property
    def config(self) -> ExceiverConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        return (f"Exceiver({c.n_genes:,} genes, gene_dim={c.gene_dim}, {c.n_latents} latents x "
                f"{c.latent_dim}, {c.n_layers} layers, {self.module.n_parameters():,} parameters)")

    @classmethod
    def pretrained(cls, name: str | None = None) -> Exceiver:
        """A model shipped with exceiver, by name (docs/models.md; None: the best that ships,
        `exceiver.shipped.DEFAULT_MODEL`), checked against its checksums."""
        from exceiver.shipped import DEFAULT_MODEL, shipped_folder

        return cls.load(shipped_folder(name or DEFAULT_MODEL))

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
                   layer=data.get("layer"), batches=batches, gene_map=gene_map,
                   allow_non_integer=bool(data.get("allow_non_integer", False)))

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
                  "training": self.training, "data": self.contract.to_dict()}
        if self.classes:
            config["classes"] = self.classes
        if self.batches:
            config["batches"] = self.batches
        save_model_files(folder, config=config, state_dict=self.module.state_dict(), vocab=self.vocab,
                         scaler=self.scaler, metrics=self.metrics, gene_map=self.gene_map)

    def read(self, adata: ad.AnnData, *, empty: str = "refuse", **options: Unpack[ReadingOptions]) -> ModelCells:
        """`adata` as this model reads it: the one reading path of every tool (`exceiver.data.contract`).

        Parameters
        ----------
        adata
            Raw counts; a backed AnnData (`read_h5ad(path, backed="r")`) is streamed from its file.
        empty
            "refuse" cells without counts in the model's trained genes, "drop" them (reports), or
            "keep" them for a further restriction that refuses them then (`ModelCells.keep_genes`).
        **options
            `gene_key`, `layer`, `gene_map`, `allow_non_integer`, `name`: a call's choices; each
            left out keeps what the model remembers (`exceiver.data.contract.ReadingOptions`).

        Returns
        -------
        The cells on the model's trained genes, with the dataset's gene names both ways.
        """
        return read_dataset(adata, self.vocab, self.scaler.trained_genes, self.contract, options, empty=empty)

    def cells(self, adata: ad.AnnData, **options: Unpack[ReadingOptions]) -> CellCounts:
        """The dataset's counts in vocabulary space on the trained genes, as every tool reads them
        (`read(adata, **options).cells`, in memory)."""
        return self.read(adata, **options).in_memory()

    @torch.inference_mode()
    def embed(self, adata: ad.AnnData, *, key_added: str = "X_exceiver", pooling: str | None = None,
              inplace: bool = True, batch_size: int | None = None, device: str | None = None, num_workers: int = 0,
              progress: bool = True, **reading: Unpack[ReadingOptions]) -> np.ndarray:
        """Cell embeddings of `adata`, returned and written to `adata.obsm[key_added]`.

        Parameters
        ----------
        adata
            Raw counts (a backed AnnData is read from disk chunk by chunk).
        key_added
            The `obsm` key; the settings go to `adata.uns["exceiver"][key_added]`.
        pooling
            "bottleneck" (the cell bottleneck: the default of models that have one), "mean" (the
            mean of the processed latents: the default of others) or "flatten" (all of them, the
            original's).
        inplace
            False: returned only, `adata` untouched.
        batch_size, device, num_workers, progress
            How inference runs (`device`: "auto", "cpu", "cuda", "mps", ...; checked first).
        **reading
            How the dataset is read (`Exceiver.read`): mouse data is translated into a human
            model's genes through the model's own gene map without being asked.

        Returns
        -------
        float32 array [cells, width].
        """
        inference_device(device)  # before any data is read
        pooling = check_pooling(pooling, self.module)
        embedding = cell_embedding(self, self.read(adata, **reading), pooling, batch_size=batch_size, device=device,
                                   num_workers=num_workers, progress=progress)
        if inplace:
            adata.obsm[key_added] = embedding
            record(adata, key_added, {"pooling": pooling, "n_genes": len(self.vocab)})
        return embedding

    @torch.inference_mode()
    def embed_file(self, path: str | Path, out: str | Path, *, key_added: str = "X_exceiver", pooling: str | None = None,
                   batch_size: int | None = None, device: str | None = None, num_workers: int = 0,
                   overwrite: bool = False, progress: bool = True, **reading: Unpack[ReadingOptions]) -> Path:
        """`embed` from an .h5ad file to a copy of it with `obsm[key_added]` added, streaming:
        neither the counts nor the embeddings are ever all in memory (translated data included)."""
        device = inference_device(device)
        pooling = check_pooling(pooling, self.module)
        with claim(out, overwrite=overwrite, folder=False):  # refused now, not after the work
            h5ad_var(path)  # a missing or unreadable file is refused in one line
            cells = self.read(ad.read_h5ad(path, backed="r"), **{"name": Path(path).stem, **reading})
            width = self.module.embedding_width(pooling)
            with h5ad_copy_with_obsm(path, out, key_added, (cells.n_cells, width), overwrite=overwrite) as write:
                for batch, latents in cell_latents(self, cells, batch_size=batch_size, device=device,
                                                   num_workers=num_workers, progress=progress, desc="embedding"):
                    write(batch.cells.cpu().numpy(), self.module.pool(latents, pooling).float().cpu().numpy())
                write.uns({"pooling": pooling, "n_genes": len(self.vocab)})
        return Path(out)

    @torch.inference_mode()
    def predict_values(self, adata: ad.AnnData, query_genes: Sequence[str] | None = None, *,
                       batch_size: int | None = None, device: str | None = None, progress: bool = True,
                       **reading: Unpack[ReadingOptions]) -> np.ndarray:
        """The masked-value head's prediction for each query gene in each cell, from the cell's
        tokens (nothing masked; cells with more than `max_tokens` expressed genes are subsampled as
        in `embed`), in the model's value space (z-score + 1, or log-normalised expression for
        models with `values="log"`; `scaler.log_expression` maps either back).

        Parameters
        ----------
        query_genes
            Genes as the dataset names them (or by the model's names); default: every vocabulary
            gene, in vocabulary order.
        **reading
            How the dataset is read (`Exceiver.read`).

        Returns
        -------
        float32 array [cells, query genes].
        """
        inference_device(device)
        cells = self.read(adata, **reading)
        ids = np.arange(len(self.vocab)) if query_genes is None else cells.resolve_genes(query_genes, "query genes")
        return decoded_values(self, cells, ids, batch_size=batch_size, device=device, progress=progress)

    @torch.inference_mode()
    def predict_logits(self, adata: ad.AnnData, *, batch_size: int | None = None, device: str | None = None,
                       progress: bool = True, **reading: Unpack[ReadingOptions]) -> np.ndarray:
        """Class-token logits [cells, classes] (columns: `self.classes`; reading: `Exceiver.read`)."""
        if self.module.class_head is None:
            raise ExceiverInputError("this model has no class head: it predicts expression, not classes")
        inference_device(device)
        cells = self.read(adata, **reading)
        logits = np.empty((cells.n_cells, self.config.n_classes), dtype=np.float32)
        for batch, latents in cell_latents(self, cells, batch_size=batch_size, device=device, progress=progress,
                                           desc="classifying"):
            logits[batch.cells.cpu().numpy()] = self.module.class_logits(latents).float().cpu().numpy()
        return logits

    def predict_proba(self, adata: ad.AnnData, **options) -> np.ndarray:
        """Class probabilities [cells, classes] (softmax of `predict_logits`, which takes `options`)."""
        logits = self.predict_logits(adata, **options)
        return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()

    def predict(self, adata: ad.AnnData, *, key_added: str = "exceiver_prediction", inplace: bool = True,
                batch_size: int | None = None, device: str | None = None, progress: bool = True,
                **reading: Unpack[ReadingOptions]) -> pd.Series:
        """Predicted class of each cell.

        Parameters
        ----------
        key_added
            `obs[key_added]` gets the class, `obsm["exceiver_probabilities"]` the probabilities
            ("exceiver" is `key_added` without its "_prediction" suffix) and
            `uns["exceiver"][key_added]["classes"]` the class names (the probabilities' columns).
        inplace
            False: returned only, `adata` untouched.
        **reading
            How the dataset is read (`Exceiver.read`).

        Returns
        -------
        A categorical Series indexed by the cells.
        """
        proba = self.predict_proba(adata, batch_size=batch_size, device=device, progress=progress, **reading)
        classes = np.asarray(self.classes)
        prediction = pd.Series(pd.Categorical(classes[proba.argmax(1)], categories=classes),
                               index=adata.obs_names, name=key_added)
        if inplace:
            adata.obs[key_added] = prediction
            adata.obsm[f"{key_added.removesuffix('_prediction')}_probabilities"] = proba.astype(np.float32)
            record(adata, key_added, {"classes": list(classes)})
        return prediction

    def annotate(self, reference: ad.AnnData | str | Path, query: ad.AnnData | str | Path, label_key: str,
                 **options) -> pd.DataFrame:
        """Transfer `reference.obs[label_key]` to the query's cells through this model's cell
        embedding (logistic regression by default): `obs["exceiver_label"]` and `obs["exceiver_label_confidence"]`
        written to the query unless `inplace=False`, and returned. Options: `exceiver.tl.annotate`."""
        from exceiver.tl.annotation import annotate

        return annotate(self, reference, query, label_key, **options)

    def evaluate(self, data: ad.AnnData | str | Path, out: str | Path, **options) -> dict:
        """Evaluate this model on `data` and write a report to `out` (`exceiver.evaluate.evaluate`)."""
        from exceiver.evaluate.report import evaluate

        return evaluate(self, data, out, **options)

    def gene_embeddings(self) -> pd.DataFrame:
        """The learned gene embedding of every vocabulary gene (rows indexed by gene)."""
        return gene_embedding_table(self.module, self.vocab)

    def on_device(self, device: str | None) -> contextlib.AbstractContextManager[torch.device]:
        """Run on `device` (see `exceiver.devices.inference_device`) and leave the network where the
        user had it afterwards."""
        return on_device(self.module, device)


def import_original(ckpt_path: str | Path, genes: str | Path | Sequence[str] | None = None,
                    scaler: str | Path | None = None) -> Exceiver:
    """An Exceiver from a checkpoint of the original release, computing exactly as the original
    code (see `exceiver.nn.original.original_parts` for `genes` and `scaler`)."""
    module, tokenizer, vocab, gene_scaler, training, classes = original_parts(ckpt_path, genes, scaler)
    return Exceiver(module, vocab, gene_scaler, tokenizer, training=training, classes=classes)
