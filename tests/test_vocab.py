import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from exceiver.errors import ExceiverInputError
from exceiver.data.cells import CellCounts, align
from exceiver.data.vocab import GeneVocab, read_gene_list


def _adata(counts, genes, **var_columns):
    var = pd.DataFrame(var_columns, index=genes)
    return ad.AnnData(sp.csr_matrix(np.asarray(counts, dtype=np.float32)), var=var)


def test_vocab_union_keeps_first_appearance_order_and_restricts():
    vocab = GeneVocab.from_gene_lists([["B", "A", "C"], ["C", "D", ""]])
    assert list(vocab.genes) == ["B", "A", "C", "D"]
    restricted = GeneVocab.from_gene_lists([["B", "A", "C"], ["D"]], restrict_to=["D", "A", "Z"])
    assert list(restricted.genes) == ["A", "D"]
    with pytest.raises(ExceiverInputError, match="none of the datasets' 4 genes is in the gene list"):
        GeneVocab.from_gene_lists([["B", "A", "C"], ["D"]], restrict_to=["X"])


def test_vocab_rejects_duplicates_and_round_trips(tmp_path):
    with pytest.raises(ExceiverInputError, match="duplicated identifiers"):
        GeneVocab(["A", "B", "A"])
    vocab = GeneVocab(["TP53", "CD3E", "Gapdh"])
    vocab.save(tmp_path / "genes.txt")
    assert GeneVocab.load(tmp_path / "genes.txt") == vocab
    assert list(vocab.ids(["CD3E", "nope", "TP53"])) == [1, -1, 0]


def test_read_gene_list_takes_first_field_and_skips_comments(tmp_path):
    path = tmp_path / "genes.tsv"
    path.write_text("# protein coding\nTP53\tENSG1\nCD3E,x\n\nTP53\n")
    assert read_gene_list(path) == ["TP53", "CD3E"]
    with pytest.raises(ExceiverInputError, match="does not exist"):
        read_gene_list(tmp_path / "missing.txt")


def test_align_maps_columns_and_marks_unmeasured_genes(caplog):
    vocab = GeneVocab(["A", "B", "C", "D"])
    adata = _adata([[1, 0, 5], [0, 2, 0]], ["C", "X", "A"])
    with caplog.at_level(logging.INFO):
        cells = align(adata, vocab, name="toy")
    assert "2 of 3 genes are in the vocabulary" in caplog.text
    assert cells.counts.shape == (2, 4)
    np.testing.assert_array_equal(cells.counts.toarray(), [[5, 0, 1, 0], [0, 0, 0, 0]])
    # B and D are unmeasured (not zero); C and A are measured.
    np.testing.assert_array_equal(cells.measured, [[True, False, True, False]])
    np.testing.assert_array_equal(cells.library_size, [6, 0])


def test_align_sums_duplicate_identifiers_with_a_warning(caplog):
    vocab = GeneVocab(["A", "B"])
    adata = _adata([[1, 2, 3], [0, 4, 0]], ["e1", "e2", "e3"], symbol=["A", "A", "B"])
    with caplog.at_level(logging.WARNING):
        cells = align(adata, vocab, gene_key="symbol")
    assert "1 gene identifiers occur more than once (e.g. ['A']); their counts are summed" in caplog.text
    np.testing.assert_array_equal(cells.counts.toarray(), [[3, 3], [4, 0]])


def test_align_without_overlap_names_the_matching_column():
    vocab = GeneVocab(["TP53", "CD3E", "MS4A1"])
    adata = _adata([[1, 2]], ["ENSG000001", "ENSG000002"], gene_symbol=["TP53", "CD3E"])
    with pytest.raises(ExceiverInputError, match=r"none of its 2 genes.*gene_key='gene_symbol'"):
        align(adata, vocab)
    cells = align(adata, vocab, gene_key="gene_symbol")
    np.testing.assert_array_equal(cells.counts.toarray(), [[1, 2, 0]])
    with pytest.raises(ExceiverInputError, match="gene_key='nope' names no column of var"):
        align(adata, vocab, gene_key="nope")


def test_align_warns_when_few_genes_match(caplog):
    vocab = GeneVocab([f"G{i}" for i in range(100)])
    genes = ["G0"] + [f"ENSG{i}" for i in range(99)]
    with caplog.at_level(logging.WARNING):
        align(_adata(np.ones((2, 100)), genes), vocab)
    assert "only 1 of 100 genes (1.0%) are in the model's vocabulary; are the identifiers of the right type?" \
        in caplog.text


def test_align_reads_a_counts_layer_and_dense_input():
    vocab = GeneVocab(["A", "B"])
    adata = ad.AnnData(np.array([[0.5, 1.0]], dtype=np.float32), var=pd.DataFrame(index=["A", "B"]))
    adata.layers["counts"] = np.array([[3, 1]], dtype=np.float32)
    np.testing.assert_array_equal(align(adata, vocab, layer="counts").counts.toarray(), [[3, 1]])
    with pytest.raises(ExceiverInputError, match="layer='spliced': dataset has no such layer; it has layers \\['counts'\\]"):
        align(adata, vocab, layer="spliced")
    with pytest.raises(ExceiverInputError, match="dataset has no raw counts: layer='raw' reads adata.raw"):
        align(adata, vocab, layer="raw")


def test_concat_keeps_each_datasets_measured_genes():
    vocab = GeneVocab(["A", "B", "C"])
    one = align(_adata([[1, 2]], ["A", "B"]), vocab, name="one")
    two = align(_adata([[3], [4]], ["C"]), vocab, name="two")
    both = CellCounts.concat([one, two])
    assert both.n_cells == 3 and both.source_names == ["one", "two"]
    np.testing.assert_array_equal(both.source, [0, 1, 1])
    np.testing.assert_array_equal(both.measured, [[True, True, False], [False, False, True]])
    np.testing.assert_array_equal(both.counts.toarray(), [[1, 2, 0], [0, 0, 3], [0, 0, 4]])


def test_vocab_file_round_trips_verbatim_and_rejects_unsaveable_names(tmp_path):
    odd = ["A,1", "#B", "C-2", "HLA-DRB1", "Gene name with space"]
    vocab = GeneVocab(odd)
    vocab.save(tmp_path / "genes.txt")
    assert list(GeneVocab.load(tmp_path / "genes.txt").genes) == odd
    for bad in (["A", "B\nC"], ["A", " B"], ["A\tB"], ["A", ""]):
        with pytest.raises(ExceiverInputError, match="empty, have surrounding whitespace or contain tabs"):
            GeneVocab(bad)


def test_var_names_are_stripped_before_matching():
    vocab = GeneVocab(["A", "B"])
    adata = _adata([[1, 2]], ["A ", " B"])
    np.testing.assert_array_equal(align(adata, vocab).counts.toarray(), [[1, 2]])


def test_keep_genes_makes_the_others_unmeasured():
    vocab = GeneVocab(["A", "B", "C"])
    cells = align(_adata([[1, 2, 3], [0, 5, 0]], ["A", "B", "C"]), vocab)
    kept = cells.keep_genes(np.array([True, False, True]))
    np.testing.assert_array_equal(kept.counts.toarray(), [[1, 0, 3], [0, 0, 0]])
    np.testing.assert_array_equal(kept.measured, [[True, False, True]])
    np.testing.assert_array_equal(kept.library_size, [4, 0])
