# The README's commands. Each runs setup first; setup is quick when nothing changed.
.PHONY: setup test demo bench clean

setup:
	@bash setup/setup.sh

# The test files are spread over one worker per CPU; a file's tests share its worker.
test: setup
	.venv/bin/python -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

demo: setup
	.venv/bin/cdl demo

bench: setup
	cd bench && for b in stack_startup data_put data_pipeline datum_batching data_listing label_load label_sync label_auto fashion_accuracy faults tracking_overhead \
		asha_vs_random search_workers feature_reuse fashion_throughput; do \
		../.venv/bin/python $$b.py || exit 1; done

# Stops the local stack and removes its state (databases, wherever the cluster lives; logs); the
# venvs stay.
clean:
	-.venv/bin/cdl stack down --purge
	rm -rf .cdl/postgres .cdl/logs .cdl/run .cdl/secrets .cdl/objects .cdl/label-studio
