"""Benchmark scripts (timing tables printed and written as Markdown/JSON) and their shared timing helper."""
