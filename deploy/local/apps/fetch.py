#!/usr/bin/env python3
"""Demo/test app: one HTTP request, its body on stdout (exit 1 on a status >= 400).

    fetch.py [METHOD] URL
"""
import sys
import urllib.error
import urllib.request


def main():
    args = sys.argv[1:]
    method, url = (args[0], args[1]) if len(args) == 2 else ("GET", args[0])
    req = urllib.request.Request(url, method=method, data=b"" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            sys.stdout.write(r.read().decode())
    except urllib.error.HTTPError as e:
        sys.stdout.write(e.read().decode())
        sys.exit(1)


if __name__ == "__main__":
    main()
