"""The fake cloud's API, written the way a Python shop would: FastAPI, with the third-party
idempotency middleware `fastapi-idempotency-key` (PyPI) in front of every write. None of it is
ours: the end-to-end tests drive the Terraform provider against it as well as against our own
FakeCloud, since FakeCloud agrees with our design and this server need not.

    python fastapi_cloud.py [--provisioning SECONDS] [--processing SECONDS]

It binds 127.0.0.1 on a free port, prints one JSON line, {"api": "http://127.0.0.1:PORT"},
then serves until killed:

- POST /cvms, GET /cvms, GET /cvms/{id}, DELETE /cvms/{id};
- POST /apps/{app}/cvms/{vm}/replicas, GET …/replicas, GET and DELETE …/replicas/{id};
- items start "starting" and are "running" after --provisioning seconds;
- GET /__admin/state: every item, live or deleted, and how often the create handlers ran
  (outside the idempotency middleware's reach: it guards only POST, PATCH and PUT).
"""

import argparse
import asyncio
import datetime
import json
import socket
import sys
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi_idempotency_key import IdempotencyMiddleware
from fastapi_idempotency_key.backends.memory import MemoryBackend

PROVISIONING = 1.0
PROCESSING = 0.02
ITEMS = []  # every item ever made, in order
HANDLER_RUNS = {"count": 0}

app = FastAPI()


def shown(item):
    status = "running" if time.time() >= item["ready_at"] else "starting"
    return {k: item[k] for k in ("id", "app_id", "vm_uuid", "name", "created_at")} | {"status": status}


def live(collection, item_id=None):
    return [
        i
        for i in ITEMS
        if i["collection"] == collection and not i["deleted"] and (item_id is None or i["id"] == item_id)
    ]


async def create(request: Request, collection: str, app_id=None, vm_uuid=None):
    HANDLER_RUNS["count"] += 1
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return Response(json.dumps({"error": "not JSON"}), status_code=400, media_type="application/json")
    if not isinstance(body, dict):
        return Response(json.dumps({"error": "not an object"}), status_code=400, media_type="application/json")
    # The work a create does before it commits: the window a killed client's request is in.
    await asyncio.sleep(PROCESSING)
    kind = "cvm" if collection == "cvms" else "replica"
    now = datetime.datetime.now(datetime.timezone.utc)
    item = {
        "collection": collection,
        "id": str(uuid.uuid4()),
        "app_id": app_id or str(body.get("app_id", "app-1")),
        "vm_uuid": vm_uuid or str(uuid.uuid4()),
        "name": str(body.get("name", f"{kind}-{len(live(collection)) + 1}")),
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "ready_at": time.time() + PROVISIONING,
        "deleted": False,
    }
    ITEMS.append(item)
    return Response(json.dumps(shown(item)), status_code=201, media_type="application/json")


def listed(collection):
    return {"items": [shown(i) for i in live(collection)]}


def read(collection, item_id):
    found = live(collection, item_id)
    if not found:
        return Response(json.dumps({"error": "not found"}), status_code=404, media_type="application/json")
    return shown(found[0])


def delete(collection, item_id):
    found = live(collection, item_id)
    if not found:
        return Response(json.dumps({"error": "not found"}), status_code=404, media_type="application/json")
    found[0]["deleted"] = True
    return Response(status_code=204)


@app.post("/cvms")
async def create_cvm(request: Request):
    return await create(request, "cvms")


@app.get("/cvms")
async def list_cvms():
    return listed("cvms")


@app.get("/cvms/{item_id}")
async def read_cvm(item_id: str):
    return read("cvms", item_id)


@app.delete("/cvms/{item_id}")
async def delete_cvm(item_id: str):
    return delete("cvms", item_id)


def replicas(app_id, vm):
    return f"apps/{app_id}/cvms/{vm}/replicas"


@app.post("/apps/{app_id}/cvms/{vm}/replicas")
async def create_replica(app_id: str, vm: str, request: Request):
    return await create(request, replicas(app_id, vm), app_id, vm)


@app.get("/apps/{app_id}/cvms/{vm}/replicas")
async def list_replicas(app_id: str, vm: str):
    return listed(replicas(app_id, vm))


@app.get("/apps/{app_id}/cvms/{vm}/replicas/{item_id}")
async def read_replica(app_id: str, vm: str, item_id: str):
    return read(replicas(app_id, vm), item_id)


@app.delete("/apps/{app_id}/cvms/{vm}/replicas/{item_id}")
async def delete_replica(app_id: str, vm: str, item_id: str):
    return delete(replicas(app_id, vm), item_id)


@app.get("/__admin/state")
async def state():
    resources = [
        {
            "collection": i["collection"],
            "id": i["id"],
            "name": i["name"],
            "live": not i["deleted"],
            "foreign": False,
        }
        for i in ITEMS
    ]
    return {"resources": resources, "handler_runs": HANDLER_RUNS["count"]}


def main():
    global PROVISIONING, PROCESSING
    parser = argparse.ArgumentParser()
    parser.add_argument("--provisioning", type=float, default=1.0)
    parser.add_argument("--processing", type=float, default=0.02)
    args = parser.parse_args()
    PROVISIONING = args.provisioning
    PROCESSING = args.processing
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    guarded = IdempotencyMiddleware(app, backend=MemoryBackend())
    config = uvicorn.Config(guarded, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    print(json.dumps({"api": f"http://127.0.0.1:{port}"}), flush=True)
    sys.stdout.flush()
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
