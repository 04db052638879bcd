"""Tests of the LLM expert, the response cache and the consensus expert."""
