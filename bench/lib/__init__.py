"""Support code for the benchmarks in ``bench/``, not benchmarks themselves: ``common``
(processes, h11 helpers, agent beats shared by the scripts) and ``sim_ollama`` (the simulated
Ollama node that ``routing_e2e.py`` runs, also a standalone server). The scripts in ``bench/``
state their targets and exit non-zero when one is missed; these modules have no target."""
