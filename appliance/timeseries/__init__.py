"""History graphs: where samples are kept (Debian's Prometheus, one per node, scraping
every member's ``/metrics``) and how the API reads them back as series."""
