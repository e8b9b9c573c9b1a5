# The README's commands. Each runs setup first; setup is quick when nothing changed.
.PHONY: setup test demo bench clean

setup:
	@bash setup/setup.sh

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	.venv/bin/cdl demo

bench: setup
	.venv/bin/python bench/stack_startup.py

# Stops the local stack and removes its state (databases, logs); the venvs stay.
clean:
	-.venv/bin/cdl stack down
	rm -rf .cdl/postgres .cdl/logs .cdl/run .cdl/secrets
