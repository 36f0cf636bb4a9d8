"""Campaigns: a plan (`plan`), its ledger (`ledger`), the runner that works it
(`runner`), exports for other systems (`export`), the HTML report (`report`) and
the `campaign` CLI commands (`cli`)."""
