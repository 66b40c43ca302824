from dsa.modules.indexer import LightningIndexer

__all__ = ["LightningIndexer"]
