"""Constants of the Chatterbox English model, named once (spec §0)."""

# Sample rates.
S3_SR = 16_000  # speech tokenizer, voice encoder, CAMPPlus
S3GEN_SR = 24_000  # S3Gen mel and HiFT output

# Speech tokens: 25 Hz, 6561 = 3^8 codes.
S3_HOP = 160  # 16 kHz mel hop (100 frames/s)
S3_TOKEN_HOP = 640  # 16 kHz samples per speech token
SPEECH_VOCAB_SIZE = 6561
S3GEN_HOP = 480  # 24 kHz mel hop (50 frames/s): one token = 2 frames = 960 samples
SAMPLES_PER_TOKEN = 960

# Reference-audio lengths.
ENC_COND_LEN = 6 * S3_SR  # 16 kHz samples for the T3 speech prompt
DEC_COND_LEN = 10 * S3GEN_SR  # 24 kHz samples for the S3Gen prompt

# T3 special ids.
START_TEXT = 255
STOP_TEXT = 0
START_SPEECH = 6561  # SOS / BOS
STOP_SPEECH = 6562  # EOS
MAX_TEXT_TOKENS = 2048  # text ids per row without START/STOP (text_pos_emb has 2048 + 2 rows)

# Checkpoint files of the HF repo ResembleAI/chatterbox.
REPO_ID = "ResembleAI/chatterbox"
CKPT_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
