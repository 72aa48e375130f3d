"""Where causal importances come from: one mapping module name -> tensor per ensemble member."""
