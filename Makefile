# Two commands do all set-up on a fresh machine (Python 3.10+ with venv):
#   make demo   installs into .venv and optimizes the bundled demo model, printing the summary
#   make test   installs into .venv (with test extras) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL := fixtures/demo/yolov5s_demo.onnx
DEMO_DATA := fixtures/demo

.PHONY: demo test install clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,eval]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/onnxslim-yolo optimize $(DEMO_MODEL) --calib $(DEMO_DATA)/images -o out/yolov5s_demo.opt.onnx --report out/demo_report.json

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
