"""Speech recognition scored as mlxlab scores its other tasks: a transcription task (audio/text
rows, evaluation/tasks.py) transcribed by a Whisper model, every utterance's errors kept.

- word_errors.py: Whisper's text normalizers (english_spelling.json: OpenAI's spelling map,
  english_spelling.LICENSE its license), jiwer's word and character errors per utterance, the
  corpus rates;
- scoring.py: `score_transcription`, a task's utterances read, transcribed and scored.

evaluation/paired.py pairs two runs' utterances; evaluation/results.py gives the rates'
intervals. Modules import their siblings, not this package.
"""
