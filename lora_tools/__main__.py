from lora_tools.cli import run

run()
