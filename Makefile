# The README's two commands: `make demo` (the main job) and `make test` (the tests).
.PHONY: install demo demo-down lint test

install:
	bash .ci/install

demo: install
	zstack-dev up
	zstack-dev demo up

demo-down:
	zstack-dev demo down
	zstack-dev down

lint:
	ruff check .

test: install lint
	python3 -m pytest
