"""Names, Arrow schemas and the run config: the contracts every stage relies on.

This package imports nothing else of obsfeed, so any module may import it.
"""
