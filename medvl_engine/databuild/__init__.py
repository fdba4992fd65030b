"""Data building: PubMedVision's pipeline from image-caption pairs to medical VQA, as `build-data` stages.

    records.py          image-caption rows from jsonl / parquet / datasets, the jsonl between stages
    checkpoint.py       a stage's run folder: manifest, outputs written as rows go, checkpoints, resume
    stage.py            the loop the filters share (batches in order, kept / dropped with a reason)
    filter_text.py      medical terms of a lexicon (Aho-Corasick), keep rows with enough
    filter_image.py     missing, undecodable, truncated, small images; a user's classifier hook
    dedup.py            caption embeddings (sentence-transformers), exact greedy near-duplicate removal
    reformat.py         an image-text model writes description + QA as JSON through the RolloutPool
    reformat_prompts.py the paper's template, the ten scenarios, the alignment questions
    command.py          `medvl-engine build-data STAGE`: one stage, or all of them on one config
"""
