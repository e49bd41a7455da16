"""python -m onnxslim_yolo"""
from .cli import main

main(prog_name="onnxslim-yolo")
