// The job state machine, as the server defines it. The viewer keeps no copy:
// main.js loads GET /api/meta (built from metis_stream/jobs.py) once, before it
// shows any page, and everything below reads that answer.
//
// The rules: an event type listed in state_after_event moves the job to that
// state, any other type to state_otherwise; a job only ever moves to a state
// of higher rank; a terminal state is final. An event of a terminal type ends
// the job's stream.

import { api } from "./http.js";

let meta = null; // the checked answer of GET /api/meta
let loading = null; // the request in flight, so that two callers share it

// Load the state machine (once; a failed load can be retried). Rejects with
// the request's error, or an Error if the answer is not what the viewer needs.
export function loadMeta() {
  if (meta) return Promise.resolve();
  if (!loading) {
    loading = api("api/meta").then((answer) => {
      meta = checked(answer);
    }).finally(() => {
      loading = null;
    });
  }
  return loading;
}

export function metaLoaded() {
  return meta !== null;
}

function checked(answer) {
  const problem = (what) => new Error(`the server's state machine is not usable: ${what}`);
  if (!answer || typeof answer !== "object") throw problem("not a JSON object");
  const { states, terminal_states: terminalStates, terminal_types: terminalTypes,
          state_after_event: stateAfterEvent, state_otherwise: otherwise, rank } = answer;
  if (!Array.isArray(states) || states.length === 0) throw problem("no states");
  if (!Array.isArray(terminalStates) || !Array.isArray(terminalTypes)) {
    throw problem("no terminal states or types");
  }
  if (!stateAfterEvent || typeof stateAfterEvent !== "object") throw problem("no state_after_event");
  if (!rank || typeof rank !== "object") throw problem("no rank");
  for (const state of [...states, ...terminalStates, ...Object.values(stateAfterEvent), otherwise]) {
    if (typeof state !== "string" || !Object.hasOwn(rank, state) || typeof rank[state] !== "number") {
      throw problem(`state ${JSON.stringify(state)} has no rank`);
    }
  }
  return {
    states: [...states],
    terminalStates: new Set(terminalStates),
    terminalTypes: new Set(terminalTypes),
    stateAfterEvent: new Map(Object.entries(stateAfterEvent)),
    otherwise,
    rank: new Map(Object.entries(rank)),
  };
}

// The state of a job that has no event yet (the first state the server lists).
export function initialState() {
  return meta.states[0];
}

export function isTerminalState(state) {
  return meta.terminalStates.has(state);
}

// An event of this type is a job's last: its stream ends after it.
export function isTerminalType(type) {
  return meta.terminalTypes.has(type);
}

// The state a job in `state` is in after an event of `type`.
export function stateAfter(state, type) {
  if (isTerminalState(state)) return state;
  const target = meta.stateAfterEvent.get(type) ?? meta.otherwise;
  return meta.rank.get(target) > (meta.rank.get(state) ?? -Infinity) ? target : state;
}
