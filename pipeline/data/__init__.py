"""Data: raw sources (ImageNet layouts, ImageFolder, the synthetic set) -> Parquet shards + manifest.

Import the submodules you need (`pipeline.data.sources`, `.synthetic`, `.prepare`, `.shards`); this package
imports nothing itself so that `import pipeline.data` stays cheap and side-effect free.
"""
