"""The composition root: the service that wires engine, ledger, proxy, socket and exporters."""
