"""Monitoring: drift of ingested days and of served traffic, and live checks of the endpoint."""
