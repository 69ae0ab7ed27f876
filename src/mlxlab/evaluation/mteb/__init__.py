"""MTEB's retrieval tasks in mlxlab: a text embedder scored by the `mteb` package itself (its
data, its search, its metrics), kept as mlxlab keeps its own tasks.

- tasks.py: which task-list entries are MTEB's (`mteb:NAME`), the checks before scoring (mteb
  installed, the name a retrieval task, its data in the local Hugging Face cache);
- encoder.py: `MlxlabEncoder`, mteb's encoder (its AbsEncoder) over an mlxlab TextEmbedder;
- scores.py: `score_mteb`, mteb's results as one `TaskScores` per task, split and subset.

Modules import their siblings, not this package.
"""
