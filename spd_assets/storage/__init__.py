"""Layer 2, storage: where results live and in which formats; no Dagster here.

- `store`           the results folder (`ResultsStore`): every path and every table write
- `atomic`          write-then-rename, so readers never see half a file
- `values`          value objects and their file formats (sparse activations, ensembles, distances)
- `history_format`  merge histories in the original research zip format
- `schemas`         the result tables' columns and types, in one place
- `tables`          value objects -> rows of the result tables (Polars)
- `lineage`         data versions (content fingerprints) and the lineage tables
- `database`        the DuckDB views over the Parquet tables
- `experiments`     the experiment configs registered in a results folder
"""
