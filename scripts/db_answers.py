"""Exit 0 if the database server of the DATABASE_URL given as argv[1] answers, else 1 (with the reason)."""

import sys

import environ

config = environ.Env.db_url_config(sys.argv[1])
try:
    if "postgresql" in config["ENGINE"]:
        import psycopg

        psycopg.connect(
            host=config["HOST"],
            port=config["PORT"] or 5432,
            user=config["USER"],
            dbname="postgres",
            connect_timeout=3,
        ).close()
    elif "mysql" in config["ENGINE"]:
        import pymysql

        pymysql.connect(
            host=config["HOST"],
            port=int(config["PORT"] or 3306),
            user=config["USER"],
            password=config["PASSWORD"] or "",
            connect_timeout=3,
        ).close()
except Exception as exc:  # noqa: BLE001 - any failure means "does not answer"
    print(f"{sys.argv[1]}: {exc}".splitlines()[0], file=sys.stderr)
    sys.exit(1)
