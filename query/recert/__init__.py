"""Access recertification: the review of a tenant's agents (``review``) and the signed reports made of it
(``reports``: CSV, JSON, HTML; ``pdf``), over the rows they share (``rows``), with their offline verification."""
