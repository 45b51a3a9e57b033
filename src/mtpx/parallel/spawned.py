"""Entry point of a rank that launch.join() started: runs the function given by pickle on stdin (which builds the
same model and follows rank 0). Its own module so that `python -m` does not run a module mtpx already imported."""
import pickle
import sys

if __name__ == "__main__":
    pickle.loads(sys.stdin.buffer.read())()
