"""`python -m agent` (and the zipapp's entry point): run the UDP agent."""

import sys

from agent.agent_main import main

if __name__ == "__main__":
    sys.exit(main())
