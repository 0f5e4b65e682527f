"""fairchem's OCP command line with ocp_deq's models: python main.py --mode train --config-yml NAME.yml"""

from ocp_deq.cli import main

if __name__ == "__main__":
    main()
