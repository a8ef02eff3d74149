"""Dataset preparation for fine-tuning (kohya-ss/sd-scripts' `finetune/` tools), each runnable as
`python finetune/<name>.py`:

    merge_captions_to_metadata.py  caption files  -> metadata JSON {key: {"caption"}}
    merge_dd_tags_to_metadata.py   tag files      -> metadata JSON {key: {"tags"}}
    clean_captions_and_tags.py     kohya's clean-up of the captions and tags in a metadata JSON
    prepare_buckets_latents.py     bucket sizes into the JSON, VAE latents into the trainer's latent cache

The metadata format and its reader are in library/metadata_files.py (shared with the trainers' --in_json).
"""
