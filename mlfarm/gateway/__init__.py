"""A server that speaks nuke-ML-server's protocol, so the stock MLClient Nuke node uses the farm."""
