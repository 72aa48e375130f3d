"""spd_assets: activation sources, storage and the Dagster asset graph of spd-cluster."""
