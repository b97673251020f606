"""Interop with other tools: Hugging Face transformers export and import, experiment trackers
(a fine-tuning run, `train --init-from`, is planned in run.py like any other run).

  hf_export.py     `gpt-small export`: a checkpoint as a transformers folder (GPT-2, GPT-NeoX, or
                   our own modeling code for what neither expresses)
  hf_tokenizer.py  our tokenizers as tokenizer.json files that give the same ids
  model_card.py    the exported folder's README.md
  hf_import.py     `gpt-small import`: a local GPT2LMHeadModel folder as our checkpoint
  trackers.py      `gpt-small train --logger tensorboard|wandb`
  remote/          the modeling code copied into exported folders (imports no gpt_small)

Nothing here imports transformers: the exported folders are written as plain safetensors and JSON.
"""
