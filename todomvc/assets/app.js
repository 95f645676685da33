// TodoMVC on this server's Todo-Backend API. The server is the source of
// truth: a change shows at once and is sent; its answer replaces the todo,
// and a failed change is reported and the list reloaded from the server, so
// the page never keeps showing something that was not stored. Changes are
// sent one after another, in the order they were made: each answer moves the
// session's read-your-writes cookie (todomvc_lsn) forward, and parallel
// answers could arrive out of order and move it back.
//
// The list is drawn in place, keyed by todo id: an item keeps its element
// for as long as the todo exists, and an answer from the server changes only
// what it changed. Nothing a user (or a browser test) holds on to, such as
// the field being edited or the item being read, is replaced under it.
(function () {
	'use strict';

	var API = 'todos';
	var todos = [];
	var editing = null; // id of the todo being edited
	var queue = Promise.resolve();
	var pending = new Map(); // todo id -> changes sent or queued, not answered
	var drawn = new Map(); // todo id -> its elements

	function $(selector) { return document.querySelector(selector); }
	var newTodo = $('.new-todo');
	var main = $('.main');
	var list = $('.todo-list');
	var toggleAll = $('.toggle-all');
	var footer = $('.footer');
	var count = $('.todo-count');
	var clearCompleted = $('.clear-completed');
	var status = $('.sync-status');
	var countNumber = document.createElement('strong');
	var countWords = document.createTextNode('');
	count.replaceChildren(countNumber, countWords);

	function call(method, url, body) {
		var init = { method: method, credentials: 'same-origin', headers: {} };
		if (body !== undefined) {
			init.headers['Content-Type'] = 'application/json';
			init.body = JSON.stringify(body);
		}
		return fetch(url, init).then(function (res) {
			if (res.status === 204) { return null; }
			return res.json().catch(function () { return {}; }).then(function (data) {
				if (!res.ok) { throw new Error(data.message || ('HTTP ' + res.status)); }
				return data;
			});
		});
	}

	function say(text) { status.textContent = text || ''; }

	// Queues `work` behind the changes before it. A failure is shown and the
	// list reloaded, so the page never pretends something was saved that was
	// not. While anything is unsaved the list says so (aria-busy), for
	// assistive technology and for tests that must not reload mid-save.
	function change(work) {
		busy(1);
		queue = queue.then(work).then(function () { say(''); }, function (err) {
			say('Not saved: ' + err.message);
			return load();
		}).then(function () { busy(-1); });
		return queue;
	}

	var unsaved = 0;
	function busy(delta) {
		unsaved += delta;
		if (unsaved > 0) {
			list.setAttribute('aria-busy', 'true');
		} else {
			list.removeAttribute('aria-busy');
		}
	}

	// A change to one todo: shown now, sent in turn, and the server's answer
	// taken once no later change to the same todo is still waiting.
	function changeTodo(id, send) {
		pending.set(id, (pending.get(id) || 0) + 1);
		return change(function () {
			return send().then(function (answer) {
				settle(id, answer);
			}, function (err) {
				settle(id, undefined);
				throw err;
			});
		});
	}

	function settle(id, answer) {
		var left = (pending.get(id) || 1) - 1;
		if (left > 0) {
			pending.set(id, left);
			return;
		}
		pending.delete(id);
		if (answer) { replace(answer); }
		render();
	}

	function load() {
		return call('GET', API).then(function (data) {
			todos = data;
			render();
		}, function (err) {
			say('Could not load the list (' + err.message + '); retrying.');
			return new Promise(function (resolve) { setTimeout(resolve, 1000); }).then(load);
		});
	}

	function find(id) {
		return todos.find(function (t) { return t.id === id; });
	}

	function replace(todo) {
		todos = todos.map(function (t) { return t.id === todo.id ? todo : t; });
	}

	function forget(id) {
		todos = todos.filter(function (t) { return t.id !== id; });
	}

	function filter() {
		var hash = location.hash;
		if (hash === '#/active') { return 'active'; }
		if (hash === '#/completed') { return 'completed'; }
		return 'all';
	}

	// The elements of one todo, made once.
	function elementsOf(todo) {
		var el = drawn.get(todo.id);
		if (el) { return el; }
		el = {
			li: document.createElement('li'),
			toggle: document.createElement('input'),
			label: document.createElement('label'),
			edit: null,
		};
		el.li.dataset.id = String(todo.id);
		var view = document.createElement('div');
		view.className = 'view';
		el.toggle.className = 'toggle';
		el.toggle.type = 'checkbox';
		var destroy = document.createElement('button');
		destroy.className = 'destroy';
		view.append(el.toggle, el.label, destroy);
		el.li.append(view);
		drawn.set(todo.id, el);
		return el;
	}

	// Brings one item's elements to what the todo says, touching only what
	// differs (so an unchanged item is not written to at all).
	function update(el, todo) {
		el.li.classList.toggle('completed', todo.completed);
		if (el.toggle.checked !== todo.completed) { el.toggle.checked = todo.completed; }
		if (el.label.textContent !== todo.title) { el.label.textContent = todo.title; }
		var isEditing = editing === todo.id;
		el.li.classList.toggle('editing', isEditing);
		if (isEditing && !el.edit) {
			el.edit = document.createElement('input');
			el.edit.className = 'edit';
			el.edit.value = todo.title;
			el.li.append(el.edit);
			el.edit.focus();
			el.edit.setSelectionRange(el.edit.value.length, el.edit.value.length);
		} else if (!isEditing && el.edit) {
			var edit = el.edit;
			el.edit = null;
			edit.remove();
		}
	}

	function render() {
		var shown = filter();
		var visible = todos.filter(function (t) {
			return shown === 'all' || (shown === 'active' ? !t.completed : t.completed);
		});
		var ids = new Set(todos.map(function (t) { return t.id; }));
		drawn.forEach(function (el, id) {
			if (!ids.has(id)) {
				drawn.delete(id);
				el.li.remove();
			}
		});
		// Walk the list once, moving an element only when it is out of place.
		var next = list.firstElementChild;
		visible.forEach(function (todo) {
			var el = elementsOf(todo);
			update(el, todo);
			if (el.li === next) {
				next = next.nextElementSibling;
			} else {
				list.insertBefore(el.li, next);
			}
		});
		while (next) {
			var hidden = next;
			next = next.nextElementSibling;
			hidden.remove();
		}

		var active = todos.filter(function (t) { return !t.completed; }).length;
		main.hidden = footer.hidden = todos.length === 0;
		toggleAll.checked = todos.length > 0 && active === 0;
		if (countNumber.textContent !== String(active)) { countNumber.textContent = String(active); }
		var words = active === 1 ? ' item left' : ' items left';
		if (countWords.data !== words) { countWords.data = words; }
		clearCompleted.hidden = active === todos.length;
		document.querySelectorAll('.filters a').forEach(function (a) {
			a.classList.toggle('selected', a.getAttribute('href') === (shown === 'all' ? '#/' : '#/' + shown));
		});
	}

	function idOf(node) {
		var li = node.closest('li');
		return li ? Number(li.dataset.id) : null;
	}

	function finishEditing(id, save) {
		if (editing !== id) { return; }
		var el = drawn.get(id);
		var title = el && el.edit ? el.edit.value.trim() : '';
		editing = null;
		var todo = find(id);
		if (!save || !todo) {
			render();
			return;
		}
		if (title === '') {
			forget(id);
			render();
			changeTodo(id, function () { return call('DELETE', API + '/' + id); });
		} else if (title !== todo.title) {
			replace(Object.assign({}, todo, { title: title }));
			render();
			changeTodo(id, function () { return call('PATCH', API + '/' + id, { title: title }); });
		} else {
			render();
		}
	}

	function setCompleted(todo, completed) {
		replace(Object.assign({}, todo, { completed: completed }));
		changeTodo(todo.id, function () {
			return call('PATCH', API + '/' + todo.id, { completed: completed });
		});
	}

	function destroy(todo) {
		forget(todo.id);
		changeTodo(todo.id, function () { return call('DELETE', API + '/' + todo.id); });
	}

	newTodo.addEventListener('keydown', function (e) {
		if (e.key !== 'Enter') { return; }
		var title = newTodo.value.trim();
		newTodo.value = '';
		if (!title) { return; }
		change(function () {
			return call('POST', API, { title: title }).then(function (t) { todos.push(t); render(); }, function (err) {
				if (!newTodo.value) { newTodo.value = title; }
				throw err;
			});
		});
	});

	list.addEventListener('change', function (e) {
		if (!e.target.classList.contains('toggle')) { return; }
		var todo = find(idOf(e.target));
		if (!todo) { return; }
		setCompleted(todo, e.target.checked);
		render();
	});

	list.addEventListener('click', function (e) {
		if (!e.target.classList.contains('destroy')) { return; }
		var todo = find(idOf(e.target));
		if (!todo) { return; }
		destroy(todo);
		render();
	});

	list.addEventListener('dblclick', function (e) {
		if (e.target.tagName !== 'LABEL') { return; }
		var id = idOf(e.target);
		if (!find(id)) { return; }
		if (editing !== null && editing !== id) { finishEditing(editing, true); }
		editing = id;
		render();
	});

	list.addEventListener('keydown', function (e) {
		if (!e.target.classList.contains('edit')) { return; }
		if (e.key === 'Enter') { finishEditing(idOf(e.target), true); }
		if (e.key === 'Escape') { finishEditing(idOf(e.target), false); }
	});

	list.addEventListener('focusout', function (e) {
		if (e.target.classList.contains('edit')) { finishEditing(idOf(e.target), true); }
	});

	toggleAll.addEventListener('change', function () {
		var completed = toggleAll.checked;
		todos.filter(function (t) { return t.completed !== completed; }).forEach(function (t) {
			setCompleted(t, completed);
		});
		render();
	});

	clearCompleted.addEventListener('click', function () {
		todos.filter(function (t) { return t.completed; }).forEach(destroy);
		render();
	});

	window.addEventListener('hashchange', render);
	// Changes queue up behind the first load, so it cannot overwrite them.
	busy(1);
	queue = load().then(function () { busy(-1); });
}());
