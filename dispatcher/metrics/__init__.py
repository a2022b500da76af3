"""Prometheus metrics: what each process counts (:mod:`.instruments`), what is read from the ledger
and Redis at scrape time (:mod:`.collectors`), the API's request middleware (:mod:`.middleware`)
and how a scrape is answered, by one process or by several (:mod:`.exposition`). docs/metrics.md."""
