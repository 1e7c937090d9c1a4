"""Responders: each format's answering half (see ``udptime.core.Responder``)."""
