// Running workflows: queue the graph (showing validation errors on the nodes they are about), randomise the seeds
// marked "random", stop a run, and follow the server's websocket. The messages about nodes go to the canvas's run
// state; this module keeps the rest of the page up to date: the connection dot, the queue length, the run status
// line, the banner, toasts and the gallery. It also keeps the last messages (tests and debugging read them).

import { blurTextEntry } from "./canvas.js";
import { isLink } from "./graph.js";
import { RUN_MESSAGES } from "./runstate.js";
import { randomSeed } from "./widgets.js";

const EVENT_LOG = 500;

const $ = (selector) => document.querySelector(selector);

export class Runner {
  /** notify(message, kind) shows a toast; commit() records an edit; onImage(image, nodeId) takes each output image. */
  constructor({ api, graph, canvas, notify, commit, onImage }) {
    Object.assign(this, { api, graph, canvas, notify, commit, onImage });
    this.counters = { previews: 0, executed: 0, runs: 0 };
    this.events = [];
    this._bind();
  }

  async run() {
    blurTextEntry(); // a field being edited reports its value on blur
    const doc = this.graph.toJSON();
    this.canvas.run.clearErrors();
    this.setBanner(null);
    let answer;
    try {
      answer = await this.api.queuePrompt(doc);
    } catch (err) {
      if (err.status === 400 && err.body && typeof err.body === "object") this.showValidationErrors(err.body);
      else this.notify(`Cannot queue the workflow: ${err.message}`, "error");
      return null;
    }
    this.counters.runs += 1;
    this._randomiseSeeds();
    this.notify(`Queued (#${answer.number})`);
    return answer;
  }

  /** New seeds once a run is queued, so the run that was queued keeps the seeds it was shown with. */
  _randomiseSeeds() {
    let changed = false;
    for (const node of this.graph.nodes.values()) {
      if (!node.ui.random_seed) continue;
      const spec = this.graph.defs.input(node.type, "seed");
      if (!spec || spec.kind !== "INT" || isLink(node.inputs.seed)) continue;
      node.inputs.seed = randomSeed(spec);
      this.canvas.refreshWidgets(node.id);
      changed = true;
    }
    if (changed) this.commit();
  }

  showValidationErrors(body) {
    const nodeErrors = body.node_errors || {};
    let count = 0;
    const general = [];
    for (const [id, entry] of Object.entries(nodeErrors)) {
      const errors = (entry.errors || []).map((e) => ({ type: e.type, message: e.message || e.details || e.type,
        input: e.extra_info?.input_name || null }));
      count += errors.length;
      if (id && this.graph.node(id)) this.canvas.run.setErrors(id, errors);
      else general.push(...errors.map((e) => e.message));
    }
    const message = body.error?.message || "the workflow is not valid";
    const extra = general.filter((m) => m !== message);
    const text = extra.length ? `${message}: ${extra.join("; ")}` : message;
    this.setBanner(text);
    this.notify(count ? `Not queued: ${count} problem(s) — see the marked nodes` : `Not queued: ${text}`, "error");
  }

  setBanner(text) {
    const banner = $("#banner");
    banner.hidden = !text;
    banner.querySelector(".banner-text").textContent = text || "";
  }

  async interrupt() {
    try {
      await this.api.interrupt();
    } catch (err) {
      this.notify(`Cannot stop: ${err.message}`, "error");
    }
  }

  // --- the websocket --------------------------------------------------------------------------------------------
  _bind() {
    const state = this.canvas.run;
    const status = (text) => {
      $("#run-status").textContent = text;
    };
    const page = {
      connection: ({ connected }) => {
        const dot = $("#conn");
        dot.classList.toggle("on", connected);
        dot.title = connected ? "connected to the server" : "not connected (retrying)";
      },
      status: (data) => {
        const remaining = data.status?.exec_info?.queue_remaining ?? 0;
        const el = $("#queue");
        el.textContent = remaining ? `Queue: ${remaining}` : "Idle";
        el.classList.toggle("busy", remaining > 0);
        el.dataset.remaining = String(remaining);
        $("#btn-stop").disabled = remaining === 0;
      },
      execution_start: () => {
        this.setBanner(null);
        status("Running…");
      },
      executed: (data) => {
        this.counters.executed += 1;
        for (const image of data.output?.images || []) this.onImage(image, String(data.node));
      },
      execution_success: () => {
        const seconds = state.current ? (performance.now() - state.current.started) / 1000 : null;
        status(seconds === null ? "Done" : `Done in ${seconds.toFixed(1)} s`);
      },
      execution_error: (data) => {
        const id = data.node_id !== undefined && data.node_id !== null ? String(data.node_id) : null;
        status("Failed");
        this.notify(`${id ? `${this.canvas.titleOf(id)} failed` : "The run failed"}: `
          + `${data.exception_message || "failed"}`, "error");
      },
      execution_interrupted: () => {
        status("Stopped");
        this.notify("Run stopped");
      },
    };
    for (const type of new Set([...Object.keys(page), ...RUN_MESSAGES])) {
      this.api.addEventListener(type, (e) => {
        const data = e.detail || {};
        this.events.push({ type, data: e.detail });
        if (this.events.length > EVENT_LOG) this.events.shift();
        // the page first: it reads the run (its start time) before the run state closes it
        page[type]?.(data);
        if (RUN_MESSAGES.includes(type)) state.handle(type, data);
      });
    }
    this.api.addEventListener("preview", (e) => {
      if (state.preview(e.detail.blob, e.detail.meta) !== null) this.counters.previews += 1;
    });
  }
}
