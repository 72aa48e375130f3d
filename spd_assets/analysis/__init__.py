"""Layer 2, analysis: what researchers look at, computed from stored values; no Dagster here.

- `consensus`  the ensemble's consensus clusters at an iteration chosen by a documented rule,
               with each cluster's and each component's stability
- `plots`      small PNG figures of plain values (MDL curves, distances, heatmaps)
- `contexts`   each cluster's top-activating token contexts, from the members' token batches
- `explorer`   the self-contained HTML cluster explorer
"""
